"""prumerge / prumerge_plus on hand-made tokens: IQR outliers, spatial samples, CLS-weighted neighbour merges, the
extra token, both budget modes, padding, options."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vtprune.strategies.prumerge  # registers "prumerge" before the registry lists it
import vtprune.strategies.prumerge_plus  # noqa: F401  (registers "prumerge_plus")
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.prumerge import iqr_outliers
from vtprune.strategies.prumerge_plus import grid_order

PRUMERGE = STRATEGIES.get("prumerge")
PLUS = STRATEGIES.get("prumerge_plus")

# 12 tokens. Sorted attention: .01 .01 .02 .02 .03 .03 .04 .04 .05 .06 .20 .30; Q1 (position 2.75) = .02,
# Q3 (position 8.25) = .0525, bound .0525 + 1.5 · .0325 = .10125: two outliers, 1 (.30) and 5 (.20).
# CLS order (ties → lower index): 1, 5, 8, 6, 4, 11, 2, 9, 0, 7, 3, 10. Total attention .81.
CLS = [0.02, 0.30, 0.03, 0.01, 0.04, 0.20, 0.05, 0.02, 0.06, 0.03, 0.01, 0.04]
FEATURES = [
    [2.0, 0.0],  # 0: cosine to 1: 1;     to 5: 0
    [1.0, 0.0],  # 1: outlier
    [1.0, 0.1],  # 2: to 1: .995;         to 5: .0995
    [1.0, 0.5],  # 3: to 1: .894;         to 5: .447
    [0.0, 3.0],  # 4: to 1: 0 (ties 5);   to 5: 1
    [0.0, 1.0],  # 5: outlier
    [0.1, 1.0],  # 6: to 1: .0995;        to 5: .995
    [-0.5, 1.0],  # 7: to 1: -.447;       to 5: .894
    [-1.0, 0.0],  # 8: to 1: -1;          to 5: 0
    [-1.0, -1.0],  # 9: to 1: -.707;      to 5: -.707
    [-0.2, -1.0],  # 10: to 1: -.196;     to 5: -.981
    [1.0, -1.0],  # 11: to 1: .707;       to 5: -.707
]
# token 1's neighbours by cosine: 0, 2, 3, 11, 6, then 4 and 5 (both exactly 0: the lower first), 10, 7, 9, 8
# token 5's: 4, 6, 7, 3, 2, then 0, 1, 8 (0), ...


def signals(cls=CLS, features=FEATURES, grid=None):
    n = len(cls)
    return Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        cls_attention=torch.tensor([cls]),
        features=torch.tensor([features]),
        grid=None if grid is None else torch.tensor([grid]),
    )


def row(n, entries, total):
    """A weights row: ``entries`` {token: weight} divided by ``total``."""
    out = torch.zeros(n, dtype=torch.float64)
    for token, w in entries.items():
        out[token] = w
    return (out / total).float()


def others(skip):
    return {j: CLS[j] for j in range(12) if j not in skip}


def assert_selection(sel, kept, anchors, weights):
    assert sel.kept.tolist() == kept and sel.anchors.tolist() == anchors
    assert sel.weights.shape == (len(anchors), sel.weights.shape[1])
    assert torch.allclose(sel.weights, torch.stack(weights) if weights else sel.weights, atol=1e-7)


# -- outliers ------------------------------------------------------------------------------------------------


def test_iqr_outliers_by_hand_strictly_above_the_bound():
    assert iqr_outliers(torch.tensor(CLS)) == 2
    # Q1 1.25, Q3 3.75, bound 7.5: 10 is above it, 7.5 is not (strictly above, as the authors)
    assert iqr_outliers(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 10.0])) == 1
    assert iqr_outliers(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 7.5])) == 0
    # equal scores: IQR 0, nothing above; a single token: nothing above
    assert iqr_outliers(torch.full((7,), 0.1)) == 0 and iqr_outliers(torch.tensor([0.3])) == 0
    assert iqr_outliers(torch.zeros(0)) == 0


def test_iqr_quartiles_match_numpy_percentile():
    gen = torch.Generator().manual_seed(1)
    for n in (5, 24, 576, 1001):
        scores = torch.softmax(2 * torch.randn(n, generator=gen), 0)
        x = scores.double().numpy()
        q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
        assert iqr_outliers(scores) == int((x > q3 + 1.5 * (q3 - q1)).sum())


# -- prumerge --------------------------------------------------------------------------------------------------


def test_two_outliers_merged_plus_the_extra_token_by_hand():
    # budget ceil(.25 · 12) = 3: two selected (1, 5) and the extra token. neighbours 2:
    # 1 <- 0 (.02), 2 (.03): row 1, .02, .03 over 1.05; 5 <- 4 (.04), 6 (.05): 1, .04, .05 over 1.09.
    # The extra token: every unselected token by its attention over .81 - .50 = .31, in the slot of the
    # unselected token with the most attention, 8 (.06).
    (sel,) = PRUMERGE.selections(signals(), 0.25, neighbours=2)
    assert_selection(sel, [], [1, 5, 8], [
        row(12, {1: 1.0, 0: 0.02, 2: 0.03}, 1.05),
        row(12, {5: 1.0, 4: 0.04, 6: 0.05}, 1.09),
        row(12, others({1, 5}), 0.31),
    ])
    # adaptive: the same two outliers and the extra token, whatever the budget above 3
    for ratio in (0.25, 0.5, 1.0):
        (ada,) = PRUMERGE.selections(signals(), ratio, neighbours=2, mode="adaptive")
        assert ada.kept.tolist() == [] and ada.anchors.tolist() == [1, 5, 8]
        assert torch.equal(ada.weights, sel.weights)


def test_other_selected_tokens_are_neighbours_too_and_ties_go_to_the_lower_index():
    # budget 2: 1 and the extra token. Seven neighbours of 1: 0, 2, 3, 11, 6, then the tie at cosine 0 between
    # 4 and 5 (and nothing else) -> both; with six, only 4. The extra token is anchored at 5 (.20).
    (sel,) = PRUMERGE.selections(signals(), 2 / 12, neighbours=7)
    assert_selection(sel, [], [1, 5], [
        row(12, {1: 1.0, 0: 0.02, 2: 0.03, 3: 0.01, 11: 0.04, 6: 0.05, 4: 0.04, 5: 0.20}, 1.39),
        row(12, others({1}), 0.51),
    ])
    (six,) = PRUMERGE.selections(signals(), 2 / 12, neighbours=6)
    assert torch.allclose(six.weights[0], row(12, {1: 1.0, 0: 0.02, 2: 0.03, 3: 0.01, 11: 0.04, 6: 0.05, 4: 0.04},
                                              1.19), atol=1e-7)


def test_budget_one_and_the_default_neighbours_capped_at_the_other_tokens():
    # budget 1: no room for the extra token; 32 neighbours capped at the 11 others: 1 + .51
    (sel,) = PRUMERGE.selections(signals(), 1 / 12)
    assert_selection(sel, [], [1], [row(12, {1: 1.0} | others({1}), 1.51)])
    # no neighbours: nothing to merge, the token is kept
    (alone,) = PRUMERGE.selections(signals(), 1 / 12, neighbours=0)
    assert alone.kept.tolist() == [1] and alone.num_merged == 0


def test_budget_mode_fills_by_attention_adaptive_caps():
    # budget 6: 5 selected by attention (1, 5, 8, 6, 4 — 4 before 11 at .04) and the extra token at 11
    (sel,) = PRUMERGE.selections(signals(), 0.5, neighbours=0)
    assert_selection(sel, [1, 4, 5, 6, 8], [11], [row(12, others({1, 4, 5, 6, 8}), 0.81 - 0.65)])
    # adaptive under a budget of 2: the first outlier and the extra token (anchored at the second)
    (ada,) = PRUMERGE.selections(signals(), 2 / 12, neighbours=0, mode="adaptive")
    assert ada.kept.tolist() == [1] and ada.anchors.tolist() == [5]
    # without the extra token the budget is all selected tokens, and adaptive is the two outliers
    (plain,) = PRUMERGE.selections(signals(), 0.25, neighbours=0, extra_token=False)
    assert plain.kept.tolist() == [1, 5, 8] and plain.num_merged == 0
    (ada,) = PRUMERGE.selections(signals(), 1.0, neighbours=0, extra_token=False, mode="adaptive")
    assert ada.kept.tolist() == [1, 5] and ada.num_merged == 0


def test_no_outlier_selects_one_token_in_adaptive_mode():
    s = signals(cls=[0.1] * 6, features=FEATURES[:6])
    (sel,) = PRUMERGE.selections(s, 1.0, neighbours=0, mode="adaptive", extra_token=False)
    assert sel.kept.tolist() == [0]
    (sel,) = PRUMERGE.selections(s, 1.0, neighbours=0, mode="adaptive")
    assert sel.kept.tolist() == [0] and sel.anchors.tolist() == [1]
    assert torch.allclose(sel.weights, row(6, {j: 1.0 for j in range(1, 6)}, 5.0))


def test_tokens_without_attention():
    # 0 (.6), 1 (.3), 3 (.1) carry attention, 2 none (a newline). Budget 3: 0, 1 and the extra token, which has
    # one source, 3: kept as it is. Budget 4: the extra token would average nothing (only 2 is left), so its slot
    # selects 2; with neighbours 2 has zero attention itself and is kept, the others merge.
    s = signals(cls=[0.6, 0.3, 0.0, 0.1], features=[[1.0, 0.0], [1.0, 0.2], [1.0, 0.1], [0.0, 1.0]])
    assert PRUMERGE.selections(s, 0.75, neighbours=0)[0].kept.tolist() == [0, 1, 3]
    assert PRUMERGE.selections(s, 1.0, neighbours=0)[0].kept.tolist() == [0, 1, 2, 3]
    # keep 1.0 in budget mode: nothing pruned, so nothing merged, whatever the neighbours
    (sel,) = PRUMERGE.selections(s, 1.0, neighbours=2)
    assert sel.kept.tolist() == [0, 1, 2, 3] and sel.num_merged == 0
    # budget 3, neighbours 1: 0 <- 2 (cosine .995, attention 0: nothing to merge, kept); 1 <- 2 (kept)
    (sel,) = PRUMERGE.selections(s, 0.75, neighbours=1)
    assert sel.kept.tolist() == [0, 1, 3] and sel.num_merged == 0
    # neighbours 2: 0 <- 2, 1 (.3); 1 <- 2, 0 (.6); the extra token's one source, 3, kept as it is
    (sel,) = PRUMERGE.selections(s, 0.75, neighbours=2)
    assert_selection(sel, [3], [0, 1], [row(4, {0: 1.0, 1: 0.3}, 1.3), row(4, {1: 1.0, 0: 0.6}, 1.6)])


def test_merged_vectors_follow_the_authors_update_normalised():
    # x_i + sum_j a_j x_j over i's 32 nearest other tokens by cosine, divided by 1 + sum_j a_j; the extra token
    # sum_j a_j x_j over the unselected tokens, divided by sum_j a_j. Random tokens: no ties.
    gen = torch.Generator().manual_seed(3)
    n = 576
    cls = torch.softmax(2 * torch.randn(n, generator=gen, dtype=torch.float64), 0)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    s = Signals(valid=torch.ones(1, n, dtype=torch.bool), cls_attention=cls[None].float(), features=x[None].float())
    (sel,) = PRUMERGE.selections(s, 1.0, mode="adaptive")
    a = s.cls_attention[0].double()
    unit = F.normalize(s.features[0].double(), dim=-1)
    m = iqr_outliers(a)
    selected = torch.argsort(a, descending=True)[:m]
    assert m > 32 and sel.kept.tolist() == [] and len(sel.anchors) == m + 1
    expected = {}
    for i in selected.tolist():
        sim = unit @ unit[i]
        sim[i] = -2
        near = torch.topk(sim, 32).indices
        expected[i] = (x[i] + (a[near, None] * x[near]).sum(0)) / (1 + a[near].sum())
    rest = torch.ones(n, dtype=torch.bool)
    rest[selected] = False
    extra = int(torch.nonzero(rest)[a[rest].argmax()])
    expected[extra] = (a[rest, None] * x[rest]).sum(0) / a[rest].sum()
    got = sel.weights.double() @ x
    for r, anchor in enumerate(sel.anchors.tolist()):
        assert torch.allclose(got[r], expected[anchor], atol=1e-6)


# -- prumerge_plus ---------------------------------------------------------------------------------------------

# 14 tokens: 0..5 crop 1 (2 x 3), 6 a newline, 7..12 crop 0 (2 x 3), 13 a newline. Grid order (crop 0 first):
# 7, 8, 9, 10, 11, 12, 0, 1, 2, 3, 4, 5. Sorted attention: 0 0 .01 .01 .02 .02 .03 .03 .04 .04 .05 .06 .30 .40;
# Q1 (3.25) = .0125, Q3 (9.75) = .0475, bound .1: outliers 2 (.40), 12 (.30).
PLUS_CLS = [0.03, 0.02, 0.40, 0.04, 0.05, 0.01, 0.0, 0.02, 0.06, 0.03, 0.01, 0.04, 0.30, 0.0]
PLUS_GRID = [[1, r, c] for r in range(2) for c in range(3)] + [[-1, -1, -1]] + \
    [[0, r, c] for r in range(2) for c in range(3)] + [[-1, -1, -1]]
PLUS_FEATURES = [[float(i % 5), 1.0] for i in range(14)]


def plus_signals(cls=PLUS_CLS, features=PLUS_FEATURES, grid=PLUS_GRID):
    return signals(cls, features, grid)


def test_grid_order():
    assert grid_order(torch.tensor(PLUS_GRID)).tolist() == [7, 8, 9, 10, 11, 12, 0, 1, 2, 3, 4, 5]
    assert grid_order(torch.tensor([[-1, -1, -1]] * 3)).tolist() == []


def test_plus_adaptive_is_the_outliers_and_the_authors_stride():
    # m = 2 of N = 14: stride (14 // 2) // 3 = 2 over the grid order: 7, 9, 11, 0, 2, 4; 2 is an outlier already.
    # Selected: 2, 12, 7, 9, 11, 0, 4 (7) and the extra token, 8 slots: fits a budget of 8. The extra token: the
    # unselected 1, 3, 5, 6, 8, 10, 13 (.02 .04 .01 0 .06 .01 0 = .14), anchored at 8 (.06).
    (sel,) = PLUS.selections(plus_signals(), 8 / 14, neighbours=0, mode="adaptive")
    assert_selection(sel, [0, 2, 4, 7, 9, 11, 12], [8],
                     [row(14, {1: 0.02, 3: 0.04, 5: 0.01, 8: 0.06, 10: 0.01}, 0.14)])
    # a budget of 7 cannot hold the 8 slots: the budget selection (below)
    (capped,) = PLUS.selections(plus_signals(), 0.5, neighbours=0, mode="adaptive")
    (budgeted,) = PLUS.selections(plus_signals(), 0.5, neighbours=0)
    assert capped.kept.tolist() == budgeted.kept.tolist() and capped.anchors.tolist() == budgeted.anchors.tolist()


def test_plus_budget_mode_spreads_the_rest_over_the_grid():
    # budget 7: 6 selected + the extra token. Outliers 2, 12; the other 4 evenly over the remaining patches in grid
    # order, 7 8 9 10 11 0 1 3 4 5 (L = 10), at positions floor(i · 10 / 4) = 0, 2, 5, 7: 7, 9, 0, 3.
    # Unselected: 1 4 5 6 8 10 11 13 (.02 .05 .01 0 .06 .01 .04 0 = .19): the extra token at 8.
    (sel,) = PLUS.selections(plus_signals(), 0.5, neighbours=0)
    assert_selection(sel, [0, 2, 3, 7, 9, 12], [8],
                     [row(14, {1: 0.02, 4: 0.05, 5: 0.01, 8: 0.06, 10: 0.01, 11: 0.04}, 0.19)])
    # budget 2: the top outlier and the extra token; budget 1: the top outlier
    assert PLUS.selections(plus_signals(), 2 / 14, neighbours=0)[0].kept.tolist() == [2]
    assert PLUS.selections(plus_signals(), 2 / 14, neighbours=0)[0].anchors.tolist() == [12]
    assert PLUS.selections(plus_signals(), 1 / 14, neighbours=0)[0].kept.tolist() == [2]
    # without the extra token, budget 3 is the two outliers and one spread token, the first in grid order: 7
    assert PLUS.selections(plus_signals(), 3 / 14, neighbours=0, extra_token=False)[0].kept.tolist() == [2, 7, 12]


def test_plus_past_the_patches_and_newlines_never_merge():
    # budget 14 (keep 1.0): every token as it is. Budget 13: the 12 patches, then the newlines by attention order
    # (0: the lower index first); the extra token would average nothing (6 and 13 have no attention), so its slot
    # selects newline 6. The newline (zero attention) stays as it is, every patch token merges (its neighbours
    # carry attention).
    (sel,) = PLUS.selections(plus_signals(), 1.0)
    assert sel.kept.tolist() == list(range(14)) and sel.num_merged == 0
    (sel,) = PLUS.selections(plus_signals(), 13 / 14)
    assert sel.kept.tolist() == [6]
    assert sel.anchors.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    assert not sel.weights[:, [6, 13]].any()
    (sel,) = PLUS.selections(plus_signals(), 13 / 14, neighbours=0, extra_token=False)
    assert sel.kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_plus_stride_on_a_24_by_24_grid_matches_the_authors_positions():
    # 32 outliers of 576 tokens: stride (576 // 32) // 3 = 6 -> flat positions 0, 6, ..., 570 (96), plus the
    # outliers, 16 of which lie on the stride: 96 + 16 = 112 selected
    n = 576
    outliers = torch.arange(0, n, 18)
    outliers[1::2] += 1  # half of them off the stride
    cls = torch.full((n,), 0.001)
    cls[outliers] = 0.05
    assert iqr_outliers(cls) == 32
    p = torch.arange(n)
    grid = torch.stack([torch.zeros_like(p), p // 24, p % 24], dim=1)
    s = Signals(valid=torch.ones(1, n, dtype=torch.bool), cls_attention=cls[None],
                features=torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0)), grid=grid[None])
    (sel,) = PLUS.selections(s, 1.0, neighbours=0, mode="adaptive", extra_token=False)
    expected = sorted(set(range(0, n, 6)) | set(outliers.tolist()))
    assert len(expected) == 112 and sel.kept.tolist() == expected


# -- both ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["budget", "adaptive"])
def test_padding_never_used_and_batched_equals_per_sample(mode):
    # sample 1 has 9 valid tokens of 12; its padding has the highest attention and copies of the outliers' vectors
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    short_cls = [0.02, 0.30, 0.03, 0.01, 0.04, 0.02, 0.05, 0.02, 0.06]
    cls = torch.tensor([CLS, short_cls + [9.0] * 3])
    features = torch.tensor([FEATURES, FEATURES[:9] + [[1.0, 0.0]] * 3])
    grid = torch.tensor([[[0, i // 4, i % 4] for i in range(12)]] * 2)
    grid[1, 9:] = -1
    batch = Signals(valid=valid, cls_attention=cls, features=features, grid=grid)
    for strategy in (PRUMERGE, PLUS):
        for ratio in (0.1, 0.4, 1.0):
            both = strategy.selections(batch, ratio, mode=mode, neighbours=3)
            alone = [
                strategy.selections(signals(CLS, FEATURES, grid[0].tolist()), ratio, mode=mode, neighbours=3)[0],
                strategy.selections(signals(short_cls, FEATURES[:9], grid[1, :9].tolist()), ratio, mode=mode,
                                    neighbours=3)[0],
            ]
            for x, y in zip(both, alone):
                assert x.kept.tolist() == y.kept.tolist() and x.anchors.tolist() == y.anchors.tolist()
                width = y.weights.shape[1]
                assert torch.equal(x.weights[:, :width], y.weights) and not x.weights[:, width:].any()
            assert max(both[1].slots.tolist()) < 9
    # sample 1 on its own: 1 (.30) is its only outlier (Q1 .02, Q3 .05, bound .095); the extra token at 8 (.06)
    (_, sel) = PRUMERGE.selections(batch, 1.0, mode="adaptive", neighbours=0)
    assert sel.kept.tolist() == [1] and sel.anchors.tolist() == [8]


@pytest.mark.parametrize("strategy", [PRUMERGE, PLUS], ids=["prumerge", "prumerge_plus"])
def test_budget_respected_and_weights_well_formed(strategy):
    gen = torch.Generator().manual_seed(0)
    n = 16
    p = torch.arange(n)
    s = Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        cls_attention=torch.softmax(2 * torch.randn(1, n, generator=gen), -1),
        features=torch.randn(1, n, 3, generator=gen),
        grid=torch.stack([torch.zeros_like(p), p // 4, p % 4], dim=1)[None],
    )
    for mode in ("budget", "adaptive"):
        for extra_token in (True, False):
            for neighbours in (0, 3, 32):
                for k in range(1, n + 1):
                    (sel,) = strategy.selections(s, k / n, mode=mode, extra_token=extra_token, neighbours=neighbours)
                    slots = len(sel.kept) + sel.num_merged
                    assert (slots == k) if mode == "budget" else (1 <= slots <= k)
                    assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
                    assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
                    assert (sel.weights >= 0).all() and (sel.weights > 0).sum(dim=1).ge(2).all()
                    if neighbours == 0 and not extra_token:
                        assert sel.num_merged == 0


def test_registration_and_options():
    from vtprune.config import config_from_dict

    for strategy in (PRUMERGE, PLUS):
        assert strategy.merges and strategy.merge_space == "vision" and strategy.stage == "pre_llm"
        assert set(strategy.options) == {"mode", "neighbours", "extra_token"}
        assert strategy.options["mode"].default == "budget" and strategy.options["neighbours"].default == 32
    assert PRUMERGE.needs == ("cls_attention", "features")
    assert PLUS.needs == ("cls_attention", "features", "grid")

    def load(name, options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": name, "options": options}}
        )

    for name in ("prumerge", "prumerge_plus"):
        good = {"mode": "adaptive", "neighbours": 0, "extra_token": False}
        assert load(name, good).pruning.options == good
        assert load(name, {"neighbours": 4096}).pruning.options == {"neighbours": 4096}
        for key, bad in (("mode", "iqr"), ("neighbours", -1), ("neighbours", 4097), ("neighbours", 2.5),
                         ("extra_token", "yes")):
            with pytest.raises(ConfigError, match=key):
                load(name, {key: bad})
    with pytest.raises(ValueError, match="mode"):
        PRUMERGE.select(signals(), 0.5, mode="iqr")
    with pytest.raises(ValueError, match="neighbours"):
        PLUS.select(signals(grid=[[0, 0, i] for i in range(12)]), 0.5, neighbours=-1)
