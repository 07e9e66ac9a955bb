"""vscan on hand-made grids: windowed local scan, global scan, merging before the LLM; last-token pruning inside."""

import pytest
import torch

import vtprune.strategies.vscan  # noqa: F401  (registers "vscan" before the registry lists it)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.base import fraction_layer
from vtprune.strategies.vscan import keep_vscan, schedule

VSCAN = STRATEGIES.get("vscan")

# A 4 × 4 crop, token 4·row + column; with windows=2 the windows are 2 × 2:
#    0  1 |  2  3        W0 = {0, 1, 4, 5}    W1 = {2, 3, 6, 7}
#    4  5 |  6  7        W2 = {8, 9, 12, 13}  W3 = {10, 11, 14, 15}
#   ------+------
#    8  9 | 10 11
#   12 13 | 14 15
CELLS = [(0, r, c) for r in range(4) for c in range(4)]
# Two vision layers (L = 2): the default shallow layer is round(6/23 · 2 = 0.52) = 1, the deep layer is 2.
# Shallow, best first per window: W0 1 (.50), 4 (.20), 0, 5;  W1 2 (.30), 7 (.25), 6, 3;
# W2 12 (.40), 13 (.35), 9, 8;  W3 15 (.09), 14 (.08), 11, 10.
SHALLOW = [0.10, 0.50, 0.30, 0.01, 0.20, 0.05, 0.02, 0.25, 0.03, 0.04, 0.06, 0.07, 0.40, 0.35, 0.08, 0.09]
# Deep, best first: 1 (.90), 0, 5, 3, 9, 10, 11, then 15, 14, 13, 12, 2, 7, 6, 4, 8.
DEEP = [0.80, 0.90, 0.05, 0.60, 0.02, 0.70, 0.03, 0.04, 0.01, 0.50, 0.45, 0.40, 0.06, 0.07, 0.08, 0.09]
FEATURES = [
    [1.0, 0.0, 0.0],  # 0
    [0.0, 1.0, 0.0],  # 1
    [0.0, 0.0, 1.0],  # 2
    [-1.0, 0.0, 0.0],  # 3
    [2.0, 0.1, 0.0],  # 4: -> 0 (cos .999; 10: .742, 12: .706)
    [0.0, -1.0, 0.0],  # 5
    [0.0, 0.0, 3.0],  # 6: -> 2 (cos 1; 12 and 15: .707)
    [5.0, 5.0, 0.0],  # 7: -> 10 (cos 1)
    [0.0, -1.0, -1.0],  # 8: 1/√2 to both 5 and 9 (the same float): the lower, 5
    [0.0, 0.0, -1.0],  # 9
    [1.0, 1.0, 0.0],  # 10
    [0.1, 0.0, 1.0],  # 11: -> 2 (cos .995; 12: .774)
    [1.0, 0.0, 1.0],  # 12
    [-3.0, 0.0, 0.1],  # 13: -> 3 (cos .999)
    [1.0, 0.0, 0.0],  # 14: -> 0 (cos 1; 10 and 12: .707)
    [0.0, 1.0, 1.0],  # 15
]


def signals(shallow=SHALLOW, deep=DEEP, cells=CELLS, features=FEATURES, num_visual=None):
    return Signals(
        valid=torch.ones(1, len(cells), dtype=torch.bool),
        vision_cls_attention=torch.tensor([[shallow, deep]]),
        grid=torch.tensor([cells]),
        features=torch.tensor([features]),
        num_visual=None if num_visual is None else torch.tensor([num_visual]),
    )


def rows(n, groups):
    """Expected weights: one row per group, uniform over its members."""
    out = torch.zeros(len(groups), n)
    for r, members in enumerate(groups):
        out[r, members] = 1 / len(members)
    return out


def in_llm(heads, stage=1, num_visual=16, valid=None):
    attention = torch.tensor([heads])
    return Signals(
        valid=torch.ones(attention.shape[0], attention.shape[2], dtype=torch.bool) if valid is None else valid,
        last_token_attention=attention,
        stage=stage,
        num_visual=torch.tensor([num_visual]),
    )


def test_registration():
    assert VSCAN.stage == "in_llm" and VSCAN.before_llm and VSCAN.merges
    assert VSCAN.placement == {"layers": (0.5,)} and VSCAN.schedule is schedule
    assert set(VSCAN.needs) == {"vision_cls_attention", "features", "grid", "last_token_attention"}
    assert VSCAN.kind == "pre-LLM + in-LLM, multi-stage, merge"


def test_schedule():
    # the authors' setting: B = 64 of 576 -> 96 before the LLM, 32 in it; later stages a third of the last, >= 1
    assert schedule(576, 64 / 576, 1) == [96, 32]
    assert schedule(576, 64 / 576, 3) == [96, 32, 11, 4]
    assert schedule(576, 1 / 3, 1) == [288, 96]  # B = 192
    assert schedule(576, 1 / 3, 0) == [288]
    # B = 1: ceil(1.5) = 2, ceil(0.5) = 1; never below 1
    assert schedule(10, 0.1, 3) == [2, 1, 1, 1]
    # B = 7: ceil(10.5) = 11 is more than N = 10 -> 10 (nothing pruned before the LLM), then ceil(3.5) = 4
    assert schedule(10, 0.7, 1) == [10, 4]
    assert schedule(1, 0.5, 1) == [1, 1]
    assert schedule(10, 1.0, 2) == [10, 10, 10]


def test_shallow_layer_is_a_fraction_of_the_deep_layer():
    assert fraction_layer(6 / 23, 23) == 6  # their layer 6 of CLIP-L (L = 23, the layer the projector reads)
    assert [fraction_layer(6 / 23, n) for n in (2, 4, 12)] == [1, 1, 3]  # .52, 1.04, 3.13
    assert fraction_layer(0.0, 3) == 1 and fraction_layer(1.0, 3) == 3 and fraction_layer(0.5, 3) == 2  # 1.5 half up


def test_stage_zero_by_hand():
    # keep 0.375 of 16: B = 6, n0 = 9; local int(4.5) = 4 over 4 windows: one per window, each window's best by
    # shallow attention: 1, 2, 12, 15. Global 5 by deep attention without them: 0, 5, 3, 9, 10.
    # Merged (FEATURES): 4, 14 -> 0; 6, 11 -> 2; 13 -> 3; 8 -> 5; 7 -> 10. 1, 9, 12, 15 get nothing.
    (sel,) = VSCAN.selections(signals(), 0.375, windows=2)
    assert sel.kept.tolist() == [1, 9, 12, 15]
    assert sel.anchors.tolist() == [0, 2, 3, 5, 10]
    expected = rows(16, [[0, 4, 14], [2, 6, 11], [3, 13], [5, 8], [7, 10]])
    assert torch.allclose(sel.weights, expected, atol=0, rtol=1e-6)
    # the merged vectors are the means: (1+2+1, .1, 0) / 3 for anchor 0, (0, 0, 1+3+1) / 3 + (.1, 0, 0) / 3 for 2
    merged = sel.weights @ torch.tensor(FEATURES)
    assert torch.allclose(merged[0], torch.tensor([4 / 3, 0.1 / 3, 0.0]))
    assert torch.allclose(merged[1], torch.tensor([0.1 / 3, 0.0, 5 / 3]))


def test_the_remainder_goes_to_the_best_next_tokens():
    # local_ratio 0.7: int(6.3) = 6 local = one per window (1, 2, 12, 15) + 2 of the second bests 4 (.20),
    # 7 (.25), 13 (.35), 14 (.08): 13 and 7. Global 3 by deep: 0, 5, 3.
    (sel,) = VSCAN.selections(signals(), 0.375, windows=2, local_ratio=0.7)
    assert sel.slots.tolist() == [0, 1, 2, 3, 5, 7, 12, 13, 15]
    # local_ratio 0: all 9 by the deep layer: 1, 0, 5, 3, 9, 10, 11, 15, 14. local_ratio 1: all 9 local: two rounds
    # (1, 2, 12, 15; 13, 7, 4, 14) and the best of the third bests 0 (.10), 6 (.02), 9 (.04), 11 (.07): 0
    (sel,) = VSCAN.selections(signals(), 0.375, windows=2, local_ratio=0.0)
    assert sel.slots.tolist() == [0, 1, 3, 5, 9, 10, 11, 14, 15]
    (sel,) = VSCAN.selections(signals(), 0.375, windows=2, local_ratio=1.0)
    assert sel.slots.tolist() == [0, 1, 2, 4, 7, 12, 13, 14, 15]


def test_the_authors_default_windows_and_one_window():
    # windows=4 on a 4 × 4 grid: every token its own window; the 4 local tokens are the best window-bests, i.e.
    # the top 4 by shallow attention: 1, 12, 13, 2, as with a single window. Global: 0, 5, 3, 9, 10.
    for windows in (4, 1):
        (sel,) = VSCAN.selections(signals(), 0.375, windows=windows)
        assert sel.slots.tolist() == [0, 1, 2, 3, 5, 9, 10, 12, 13]


def test_the_shallow_layer_option_picks_the_layer():
    # shallow_layer 1.0: layer 2 (the deep one) for the local scan too. Window bests by DEEP: W0 1, W1 3, W2 9,
    # W3 10; then global 5 of the rest: 0, 5, 11, 15, 14
    (sel,) = VSCAN.selections(signals(), 0.375, windows=2, shallow_layer=1.0)
    assert sel.slots.tolist() == [0, 1, 3, 5, 9, 10, 11, 14, 15]


# Two crops, LLaVA-NeXT-like: crop 0 a 2 × 2 grid (0-3); crop 1 two rows of 3 (4-6, 8-10), a newline after each
# row (7, 11: grid -1). Extents: 2 rows, 3 columns -> windows=2 gives 1 × 2 cells: crop 0 {0, 1}, {2, 3};
# crop 1 {4, 5}, {6}, {8, 9}, {10}: six windows, two of a single token.
NEXT_CELLS = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 0, 2), (-1, -1, -1),
              (1, 1, 0), (1, 1, 1), (1, 1, 2), (-1, -1, -1)]
NEXT_SHALLOW = [0.10, 0.20, 0.30, 0.05, 0.15, 0.12, 0.01, 0.0, 0.02, 0.09, 0.03, 0.0]
NEXT_DEEP = [0.01, 0.01, 0.01, 0.20, 0.01, 0.01, 0.01, 0.0, 0.30, 0.01, 0.01, 0.0]


def next_features():
    features = torch.eye(12)
    features[[3, 7, 11]] = features[2].clone()  # 3 and both newlines point exactly like 2
    return features.tolist()


def next_signals():
    return signals(NEXT_SHALLOW, NEXT_DEEP, NEXT_CELLS, next_features())


def test_windows_per_crop_a_short_window_and_newlines():
    # keep 0.5 of 12: B = 6, n0 = 9; local_ratio 0.9: int(8.1) = 8 local. Round one, each window's best: 1, 2, 4,
    # 6, 9, 10; round two (the single-token windows have none left): 0 (.10), 3 (.05), 5 (.12), 8 (.02) -> 5, 0.
    # Global 1 of 3, 7, 8, 11 by deep: 8. Patch 3 merges into 2; the newlines 7, 11 are dropped, not merged.
    (sel,) = VSCAN.selections(next_signals(), 0.5, windows=2, local_ratio=0.9)
    assert sel.kept.tolist() == [0, 1, 4, 5, 6, 8, 9, 10] and sel.anchors.tolist() == [2]
    assert torch.equal(sel.weights, rows(12, [[2, 3]]))


def test_newlines_may_be_global():
    # keep 7/12: B = 7, n0 = ceil(10.5) = 11; local int(9.9) = 9 of the 10 patches: round one as above, round two
    # 5, 0, 3 (not 8, .02). Global 2 of 7, 8, 11: 8 (.30), then 7 before 11 (both 0). Nothing left to merge: 11 is
    # a newline, dropped.
    (sel,) = VSCAN.selections(next_signals(), 7 / 12, windows=2, local_ratio=0.9)
    assert sel.kept.tolist() == list(range(11)) and sel.num_merged == 0
    # a newline retained on a tie (deep attention 0 everywhere but token 0) is no merge target: one row of three
    # patches, the newline 1 between 0 and 2. Keep 0.5 of 4: B = 2, n0 = 3; local int(1.5) = 1: 0; global 2 of
    # 1, 2, 3 (all 0): 1, 2. Patch 3 points exactly like the newline but merges into a patch: 0 and 2 are equally
    # far (cosine 0), so the lower, 0.
    cells = [(0, 0, 0), (-1, -1, -1), (0, 0, 1), (0, 0, 2)]
    features = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    (sel,) = VSCAN.selections(signals([0.5, 0.0, 0.1, 0.1], [0.5, 0.0, 0.0, 0.0], cells, features), 0.5, windows=1)
    assert sel.kept.tolist() == [1, 2] and sel.anchors.tolist() == [0]
    assert torch.equal(sel.weights, rows(4, [[0, 3]]))


def test_ties_go_to_the_lower_index():
    # equal shallow attention: each window's lowest index is its best (0, 2, 8, 10); global by deep: 1, 5, 3, 9, 11
    (sel,) = VSCAN.selections(signals(shallow=[0.25] * 16), 0.375, windows=2)
    assert sel.slots.tolist() == [0, 1, 2, 3, 5, 8, 9, 10, 11]


def test_keep_all():
    (sel,) = VSCAN.selections(signals(), 1.0)
    assert sel.kept.tolist() == list(range(16)) and sel.num_merged == 0
    # 0.7 of 16: B = 12, n0 = min(16, 18): nothing pruned or merged before the LLM either
    (sel,) = VSCAN.selections(signals(), 0.7)
    assert sel.kept.tolist() == list(range(16)) and sel.num_merged == 0
    heads = [[float(i) for i in range(9)]]
    assert VSCAN.select(in_llm(heads, num_visual=9), 1.0)[0].tolist() == list(range(9))


def test_budget_one():
    # keep 1/16: B = 1, n0 = 2: local int(1.0) = 1, the best window-best (1, .50); global 0 (.80). Every other
    # token merges into 0 ([1, 0, 0]) or 1 ([0, 1, 0]): cosines (to 0, to 1) 3 (-1, 0), 13 (-.999, 0) and
    # 15 (0, .707) go to 1; 7 and 10 (.707 each) and 2, 5, 6, 9 (0 each, or 0 and -1) tie to the lower, 0.
    (sel,) = VSCAN.selections(signals(), 1 / 16, windows=2)
    assert sel.kept.tolist() == [] and sel.anchors.tolist() == [0, 1]
    assert torch.allclose(sel.weights, rows(16, [[0, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14], [1, 3, 13, 15]]))
    # in the LLM: ceil(0.5) = 1 of the 2 left
    assert VSCAN.select(in_llm([[0.25, 0.5]], num_visual=16), 1 / 16)[0].tolist() == [1]


# In-LLM: two heads over 9 tokens, in 1/16ths. Head means: 0 .375, 1 .3125, 3, 4, 6 .25 (a tie), 7 .1875, ...
HEADS = [
    [0.75, 0.0, 0.125, 0.25, 0.25, 0.0, 0.0, 0.375, 0.125],
    [0.0, 0.625, 0.125, 0.25, 0.25, 0.0, 0.5, 0.0, 0.125],
]


def test_in_llm_stages_rank_by_the_head_mean():
    # 16 tokens at keep 0.375: B = 6, stage 1 keeps 3: 0, 1, then 3 of the tie 3, 4, 6 (the lower index);
    # the heads' maximum would keep 6 (.5) instead
    assert VSCAN.select(in_llm(HEADS), 0.375)[0].tolist() == [0, 1, 3]
    # stage 2: ceil(3 / 3) = 1 -> 0
    assert VSCAN.select(in_llm(HEADS, stage=2), 0.375)[0].tolist() == [0]
    # the count reads num_visual (the original N), not the tokens present: of 64, B = 24 -> 12 >= 9, all kept
    assert VSCAN.select(in_llm(HEADS, num_visual=64), 0.375)[0].tolist() == list(range(9))


def test_padding_never_used_and_batched_equals_per_sample():
    # sample 0: the 4 × 4 grid; sample 1: the two-crop sequence padded to 16 with the largest attention, a grid
    # cell that would join its windows and features like token 2's
    pad = 4
    cells = torch.tensor([CELLS, NEXT_CELLS + [(1, 0, 0)] * pad])
    attention = torch.tensor([[SHALLOW, DEEP], [NEXT_SHALLOW + [9.0] * pad, NEXT_DEEP + [9.0] * pad]])
    features = torch.zeros(2, 16, 12)  # zero columns change no cosine
    features[0, :, :3] = torch.tensor(FEATURES)
    features[1, :12] = torch.tensor(next_features())
    features[1, 12:, 2] = 1.0
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 12:] = False
    both = VSCAN.selections(Signals(valid=valid, vision_cls_attention=attention, grid=cells, features=features), 0.5,
                            windows=2)
    first = VSCAN.selections(signals(), 0.5, windows=2)[0]
    second = VSCAN.selections(next_signals(), 0.5, windows=2)[0]
    for got, alone in zip(both, (first, second)):
        assert got.kept.tolist() == alone.kept.tolist() and got.anchors.tolist() == alone.anchors.tolist()
        assert torch.equal(got.weights[:, : alone.weights.shape[1]], alone.weights)
        assert not got.weights[:, alone.weights.shape[1]:].any()
    # sample 1 alone at 0.5: B = 6, n0 = 9, local int(4.5) = 4 over 6 windows: none per window, the remainder to
    # the four best window-bests 2 (.30), 1 (.20), 4 (.15), 9 (.09) (not 10, .03, or 6, .01);
    # global 5 by deep: 8, 3, then the .01 ties in index order 0, 5, 6. 10 (one-hot) is equally far from every
    # retained token: the lowest, 0; the newlines are dropped.
    assert second.kept.tolist() == [1, 2, 3, 4, 5, 6, 8, 9] and second.anchors.tolist() == [0]
    assert torch.equal(second.weights, rows(12, [[0, 10]]))
    # in the LLM: a padded batch ranks each sample over its own tokens
    heads = torch.tensor([HEADS, [h[:5] + [1.0] * 4 for h in HEADS]])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False
    s = Signals(valid=valid, last_token_attention=heads, stage=1, num_visual=torch.tensor([16, 16]))
    assert [k.tolist() for k in VSCAN.select(s, 0.375)] == [[0, 1, 3], [0, 1, 3]]


def test_counts_and_merges_are_well_formed_over_random_inputs():
    gen = torch.Generator().manual_seed(0)
    n = 30
    cells = [(g, r, c) for g in range(2) for r in range(3) for c in range(5)]
    cells[4] = cells[17] = (-1, -1, -1)
    s = Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        vision_cls_attention=torch.rand(1, 3, n, generator=gen),
        grid=torch.tensor([cells]),
        features=torch.randn(1, n, 4, generator=gen, dtype=torch.float64).float(),
    )
    s.vision_cls_attention[0, :, [4, 17]] = 0
    merged_any = False
    for k in range(1, n + 1):
        for local_ratio in (0.0, 0.3, 0.5, 1.0):
            (sel,) = VSCAN.selections(s, k / n, local_ratio=local_ratio)
            n0 = schedule(n, k / n, 0)[0]
            assert len(sel.kept) + sel.num_merged == n0
            assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
            covered = set(sel.kept.tolist())
            if sel.num_merged:
                assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
                assert (sel.weights > 0).sum(dim=0).le(1).all() and not sel.weights[:, sel.kept].any()
                assert all(sel.weights[m, a] > 0 for m, a in enumerate(sel.anchors.tolist()))
                assert not sel.weights[:, [4, 17]].any()  # newlines: never merged, never merge targets
                covered |= set(sel.weights.nonzero()[:, 1].tolist())
            assert covered >= set(range(n)) - {4, 17}  # every patch is kept or merged
            merged_any |= sel.num_merged > 1
    assert merged_any


def test_keep_ratio_is_required_and_out_of_range_options_are_refused():
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_vscan(signals(), torch.tensor([4]))
    s = signals()
    s.keep_ratio = 0.5
    for bad in ({"local_ratio": 1.5}, {"local_ratio": -0.1}, {"shallow_layer": 1.2}, {"windows": 0}):
        with pytest.raises(ValueError, match="vscan"):
            keep_vscan(s, torch.tensor([8]), **bad)


def test_option_bounds_are_enforced_by_the_config():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "vscan", "options": options}}
        )

    options = {"local_ratio": 0.25, "shallow_layer": 0.5, "windows": 6}
    assert load(options).pruning.options == options
    for key, bad in (("local_ratio", 1.5), ("shallow_layer", -0.1), ("windows", 0), ("windows", 65)):
        with pytest.raises(ConfigError, match=key):
            load({key: bad})
