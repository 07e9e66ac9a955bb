"""sparsevlm on hand-made tokens: text raters, rater attention, the count schedule, DPC-KNN recycling."""

import math

import pytest
import torch

import vtprune.strategies.sparsevlm  # noqa: F401  (registers "sparsevlm" before the registry lists it)
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.sparsevlm import dpc_knn, raters, recycling, split, stage_count

SPARSEVLM = STRATEGIES.get("sparsevlm")

# Text after the image: t0 and t2 are (1, 0), t1 is (-5, 0). Every visual hidden state below is (a, 0) or (a, b)
# with a > 0 against text whose second coordinate is 0, so each visual row's softmax over the text is
# softmax(a · (1, -5, 1)): t0 = t2 ≈ 1/2 > 1/3 > t1: the raters are t0 and t2, never t1.
TEXT = [[1.0, 0.0], [-5.0, 0.0], [1.0, 0.0]]
VISUAL = [[1.0 + i, float(i)] for i in range(10)]
# Attention rows (units of 1/64, exact in binary) of t0, t1, t2 to the 10 visual tokens. Raters t0, t2 give scores
# (row0 + row2) / 2 = [6, 2, 12, 5, 5, 1, 12, 2, 8, 5]: order 2, 6 (tie: lower first), 8, 0, 3, 4, 9 (tie), 1, 7
# (tie), 5. t1 (not a rater) would lift 1 and 5 above everything.
ROW0 = [8, 1, 20, 4, 5, 0, 12, 3, 7, 4]
ROW1 = [0, 40, 0, 0, 0, 40, 0, 0, 0, 0]
ROW2 = [4, 3, 4, 6, 5, 2, 12, 1, 9, 6]


def signals(rows=(ROW0, ROW1, ROW2), text=TEXT, visual=VISUAL, stage=0, num_visual=None):
    return Signals(
        valid=torch.ones(1, len(visual), dtype=torch.bool),
        text_valid=torch.ones(1, len(text), dtype=torch.bool),
        text_attention=torch.tensor([rows]) / 64,
        hidden_states=torch.tensor([visual]),
        text_hidden_states=torch.tensor([text]),
        stage=stage,
        num_visual=None if num_visual is None else torch.tensor([num_visual]),
    )


def weights_row(n, members):
    row = torch.zeros(n)
    row[members] = 1 / len(members)
    return row


def test_registration():
    assert SPARSEVLM.needs == ("text_attention", "hidden_states", "text_hidden_states")
    assert SPARSEVLM.stage == "in_llm" and SPARSEVLM.merges
    assert SPARSEVLM.placement == {"layers": (3 / 32, 7 / 32, 16 / 32)}
    assert SPARSEVLM.kind == "in-LLM, multi-stage, merge"


def test_raters_above_the_mean():
    # v0 = (1, 0), v1 = (0, 1); t0 = (ln 2, 0), t1 = 0, t2 = (0, ln 2): softmax rows (2, 1, 1) / 4 and (1, 1, 2) / 4,
    # mean (0.375, 0.25, 0.375) against its mean 1/3: t0 and t2
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ln2 = math.log(2)
    text = torch.tensor([[ln2, 0.0], [0.0, 0.0], [0.0, ln2]], dtype=torch.float64)
    assert raters(visual, text).tolist() == [True, False, True]
    # t1 moved to (ln 2, ln 2): rows (2, 2, 1) / 5 and (1, 2, 2) / 5, mean (0.3, 0.4, 0.3): t1 alone
    text[1] = torch.tensor([ln2, ln2])
    assert raters(visual, text).tolist() == [False, True, False]


def test_raters_when_all_equal_are_every_text_token():
    visual = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    assert raters(visual, torch.zeros(4, 2, dtype=torch.float64)).tolist() == [True] * 4
    assert raters(visual, torch.tensor([[0.5, 0.5]], dtype=torch.float64)).tolist() == [True]


def test_schedule_reproduces_the_authors_table_at_a_third_of_576():
    assert [stage_count(c, 576, 1 / 3, s) for s, c in enumerate((576, 300, 200))] == [300, 200, 110]
    # a stage past the third uses the last multiplier; never more than what is present
    assert stage_count(110, 576, 1 / 3, 3) == 110 and stage_count(100, 576, 1 / 3, 5) == 100
    assert stage_count(250, 576, 1 / 3, 0) == 250


def test_schedule_at_other_ratios():
    # 0.25 of 576: B = 144 -> 300·144/192 = 225, 200·144/192 = 150, 110·144/192 = 82.5 -> 83
    assert [stage_count(576, 576, 0.25, s) for s in range(3)] == [225, 150, 83]
    # 0.1 of 576: B = ceil(57.6) = 58 -> 90.6 -> 91, 60.4 -> 61, 33.2 -> 34
    assert [stage_count(576, 576, 0.1, s) for s in range(3)] == [91, 61, 34]
    # B = 1 (0.01 of 10): 1.5625 -> 2, 1.04 -> 2, 0.57 -> 1
    assert [stage_count(10, 10, 0.01, s) for s in range(3)] == [2, 2, 1]
    # 0.9 of 576: B = 519 -> 811, capped at the 576 present; then 200·519/192 = 540.6 -> 541
    assert stage_count(576, 576, 0.9, 0) == 576 and stage_count(576, 576, 0.9, 1) == 541
    # keep 1.0 (and above): every token at every stage
    assert [stage_count(c, 576, 1.0, s) for s, c in enumerate((576, 576, 576, 576))] == [576] * 4
    assert stage_count(7, 576, 1.5, 2) == 7


def test_recycling_counts():
    # int(0.3·d) + 1 recycled, int(that / 10) + 1 clusters; 0.3·10 is 3.0000000000000004 -> 3
    assert [recycling(d) for d in (1, 6, 10, 30, 37, 276)] == [(1, 1), (2, 1), (4, 1), (10, 2), (12, 2), (83, 9)]


def test_split_counts_the_clusters_in_the_slots():
    # 300 of 576: 291 kept leave 285 deleted -> 86 recycled in 9 clusters: 291 + 9 = 300 (290 would give 299)
    assert split(576, 300) == (291, 86, 9)
    # 4 of 40: 3 kept -> 37 deleted -> 2 clusters, 5 > 4; 2 kept -> 38 deleted -> 12 recycled, 2 clusters: 4
    assert split(40, 4) == (2, 12, 2)
    # one slot: the top token, nothing recycled (0 clusters); two slots of 100: 1 kept, 99 deleted -> 30 recycled
    # into 1 cluster (not 4)
    assert split(10, 1) == (1, 3, 0)
    assert split(100, 2) == (1, 30, 1)
    for n in range(2, 80):
        for count in range(1, n):
            kept, recycled, clusters = split(n, count)
            assert kept >= 1 and kept + clusters == count and clusters <= recycled <= n - kept


def test_dpc_knn_two_groups():
    # distances are Euclidean / √2; 2 clusters -> density from the nearest other point (mean with self's 0):
    # p0 (0,0), p1 (1,0): nearest 1 -> e^-0.25 each; p2 (0,2), p3 (10,0), p5 (12,0): nearest 2 -> e^-1;
    # p4 (10,3): nearest 3 -> e^-2.25. Denser order (ties -> lower index): p0, p1, p2, p3, p5, p4.
    # Indicator: p0 the largest distance, |p2 p5| = √148 / √2 = √74; p1: 1/√2 (to p0); p2: 2/√2 (to p0);
    # p3: 9/√2 (to p1); p5: 2/√2 (to p3); p4: 3/√2 (to p3). Times density: p0 6.70, p3 2.34, p1 0.55,
    # p2 = p5 0.52, p4 0.22 -> centres p0, p3; p1, p2 nearest p0 and p4, p5 nearest p3.
    x = torch.tensor([[0, 0], [1, 0], [0, 2], [10, 0], [10, 3], [12, 0]], dtype=torch.float64)
    centres, assignment = dpc_knn(x, 2)
    assert centres.tolist() == [0, 3] and assignment.tolist() == [0, 0, 0, 1, 1, 1]


def test_dpc_knn_ties_go_to_the_lower_index():
    # q0 (0,0), q1 (2,0), q2 (1,0): every nearest other is 1 away, equal densities -> q0 denser than q1 than q2.
    # Indicator: q0 the largest distance 2/√2; q1 2/√2 (to q0); q2 1/√2. q0 and q1 tie -> both centres; q2 is
    # as near to either: the lower, q0.
    x = torch.tensor([[0, 0], [2, 0], [1, 0]], dtype=torch.float64)
    centres, assignment = dpc_knn(x, 2)
    assert centres.tolist() == [0, 1] and assignment.tolist() == [0, 1, 0]
    # identical points: one cluster centred on the first
    centres, assignment = dpc_knn(torch.ones(4, 3, dtype=torch.float64), 1)
    assert centres.tolist() == [0] and assignment.tolist() == [0] * 4


def test_whole_selection_by_hand():
    # keep 0.3 of 10 at stage 0: B = 3, n_s = ceil(300·3/192) = 5; split: 4 kept + 1 cluster. Kept: 2, 6, 8, 0.
    # Deleted by score 3, 4, 9 (5 each), 1, 7, 5: d = 6 -> int(1.8) + 1 = 2 recycled: 3 and 4 (ties -> lower),
    # one cluster; with one cluster the centre is the lowest index (densities tie, and its indicator is the
    # largest distance): token 3 carries the mean of 3 and 4.
    (sel,) = SPARSEVLM.selections(signals(), 0.3)
    assert sel.kept.tolist() == [0, 2, 6, 8] and sel.anchors.tolist() == [3]
    assert torch.equal(sel.weights, weights_row(10, [3, 4])[None])
    # stage 1: n_s = ceil(200·3/192) = 4 -> 3 kept (2, 6, 8) + 1 cluster of int(0.3·7) + 1 = 3: 0, 3, 4 at 0
    (sel,) = SPARSEVLM.selections(signals(stage=1), 0.3)
    assert sel.kept.tolist() == [2, 6, 8] and sel.anchors.tolist() == [0]
    assert torch.equal(sel.weights, weights_row(10, [0, 3, 4])[None])


def test_raters_follow_the_text_hidden_states():
    # t1 turned to (1, 0) and t0, t2 to (-5, 0): t1 is the only rater and its attention, on 1 and 5, ranks first
    text = [[-5.0, 0.0], [1.0, 0.0], [-5.0, 0.0]]
    # n_s = 5: 4 kept: 1, 5 (40), then ties at 0 by index: 0, 2; pool int(1.8) + 1 = 2: 3, 4 -> anchor 3
    (sel,) = SPARSEVLM.selections(signals(text=text), 0.3)
    assert sel.kept.tolist() == [0, 1, 2, 5] and sel.anchors.tolist() == [3]


def test_schedule_reads_num_visual_not_the_current_count():
    # 10 tokens present after earlier stages of 576 at keep 1/3: stage 2 leaves min(10, 110) -> all, no merge
    (sel,) = SPARSEVLM.selections(signals(stage=2, num_visual=576), 1 / 3)
    assert sel.kept.tolist() == list(range(10)) and sel.num_merged == 0
    # of 40 at keep 0.1 (B = 4), stage 1: ceil(200·4/192) = 5 of the 10 present -> as in the hand-worked case
    (sel,) = SPARSEVLM.selections(signals(stage=1, num_visual=40), 0.1)
    assert sel.kept.tolist() == [0, 2, 6, 8] and sel.anchors.tolist() == [3]


def test_keep_one_and_budget_one():
    for ratio in (1.0, 0.9):  # 0.9: B = 9, n_s = ceil(14.06) = 15 >= 10
        (sel,) = SPARSEVLM.selections(signals(), ratio)
        assert sel.kept.tolist() == list(range(10)) and sel.num_merged == 0
    # keep 0.1 at stage 2: B = 1, n_s = ceil(110/192) = 1: the top token (2, before 6 on the tie), no merge
    (sel,) = SPARSEVLM.selections(signals(stage=2), 0.1)
    assert sel.kept.tolist() == [2] and sel.num_merged == 0


def test_two_clusters_by_hand():
    # 40 tokens, a single text token (always the rater), attention 40 - i: order 0, 1, 2, ...
    # keep 0.15 of 40 at stage 2: B = 6, n_s = ceil(110·6/192) = 4: 2 kept (0, 1) + 12 recycled (2..13) in 2
    # clusters. Hidden states: 2, 3, 4, 6, 7 at (0, 0), 5 at (0, 1), 8..13 at (10, 0), the rest far away.
    # Densities: the copies 1 (a neighbour at 0), 5 e^-0.25. Denser order: 2, 3, 4, 6, 7, 8, ..., 13, then 5.
    # Indicators: 2 the largest distance √101/√2; 3, 4, 6, 7 and 9..13: 0 (a denser copy); 8: 10/√2 (to 2);
    # 5: 1/√2 -> centres 2 and 8; 5 nearer 2.
    visual = [[100.0, 100.0 + i] for i in range(40)]
    for i in (2, 3, 4, 6, 7):
        visual[i] = [0.0, 0.0]
    visual[5] = [0.0, 1.0]
    for i in range(8, 14):
        visual[i] = [10.0, 0.0]
    s = signals(rows=[[40.0 - i for i in range(40)]], text=[[1.0, 0.0]], visual=visual, stage=2)
    (sel,) = SPARSEVLM.selections(s, 0.15)
    assert sel.kept.tolist() == [0, 1] and sel.anchors.tolist() == [2, 8]
    assert torch.equal(sel.weights, torch.stack([weights_row(40, list(range(2, 8))), weights_row(40, list(range(8, 14)))]))


def test_padding_never_used_and_batched_equals_per_sample():
    # sample 1: 6 visual tokens and 2 text tokens (t0 its only rater: scores ROW0 = 8, 1, 20, 4, 5, 0); its padding
    # has the largest attention, and its padded text row (copy of t0, so a rater if read) looks at token 1 only
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    text_valid = torch.tensor([[True] * 3, [True, True, False]])
    pad_rows = [ROW0[:6] + [99] * 4, ROW1[:6] + [99] * 4, [0, 99, 0, 0, 0, 0] + [99] * 4]
    attention = torch.tensor([[ROW0, ROW1, ROW2], pad_rows]) / 64
    hidden = torch.tensor([VISUAL, VISUAL[:6] + [[50.0, -50.0]] * 4])
    text = torch.tensor([TEXT, TEXT[:2] + [[1.0, 0.0]]])
    both = SPARSEVLM.selections(
        Signals(valid=valid, text_valid=text_valid, text_attention=attention, hidden_states=hidden,
                text_hidden_states=text), 0.3
    )
    alone = SPARSEVLM.selections(signals(rows=[r[:6] for r in (ROW0, ROW1)], text=TEXT[:2], visual=VISUAL[:6]), 0.3)
    assert both[1].kept.tolist() == alone[0].kept.tolist() and both[1].num_merged == alone[0].num_merged == 0
    # alone: B = 2, n_s = ceil(3.125) = 4: 3 kept (2, 0, 4) + 1 cluster of int(0.9) + 1 = 1: token 3, a single
    # member: kept as it is
    assert both[1].kept.tolist() == [0, 2, 3, 4]
    # sample 0 as in the hand-worked case
    assert both[0].kept.tolist() == [0, 2, 6, 8] and both[0].anchors.tolist() == [3]
    assert torch.equal(both[0].weights, weights_row(10, [3, 4])[None])


def test_slots_match_the_schedule_and_merges_are_well_formed():
    gen = torch.Generator().manual_seed(0)
    n, t = 70, 5
    s = Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        text_valid=torch.ones(1, t, dtype=torch.bool),
        text_attention=torch.rand(1, t, n, generator=gen),
        hidden_states=torch.randn(1, n, 4, generator=gen),
        text_hidden_states=torch.randn(1, t, 4, generator=gen),
    )
    two_merges = False
    for stage in range(4):
        s.stage = stage
        for ratio in (0.02, 0.1, 0.25, 1 / 3, 0.5, 0.7):
            (sel,) = SPARSEVLM.selections(s, ratio)
            assert len(sel.kept) + sel.num_merged == stage_count(n, n, ratio, stage) and len(sel.kept) >= 1
            assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
            if sel.num_merged == 0:
                continue
            assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
            assert (sel.weights > 0).sum(dim=0).le(1).all() and not sel.weights[:, sel.kept].any()
            assert all(sel.weights[m, a] > 0 for m, a in enumerate(sel.anchors.tolist()))
            two_merges |= sel.num_merged > 1
    assert two_merges  # 70 tokens are enough for two clusters (of more than one token) somewhere


def test_keep_ratio_is_required():
    with pytest.raises(ValueError, match="keep_ratio"):
        SPARSEVLM.fn(signals(), torch.tensor([3]))
