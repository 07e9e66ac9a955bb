"""mustdrop on hand-made grids: window scores, the windows a budget merges, the growing window, the crop fallback,
patch-less tokens, padding, adaptive mode, options."""

import pytest
import torch

import vtprune.strategies.mustdrop  # noqa: F401  (registers "mustdrop" until it is listed in _MODULES)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.mustdrop import window_scores

MUSTDROP = STRATEGIES.get("mustdrop")

E, F, W, S = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]
# 4×4 grid, row-major; 2×2 windows W0 {0,1,4,5}, W1 {2,3,6,7}, W2 {8,9,12,13}, W3 {10,11,14,15}.
# Mean cosine over the 12 ordered pairs of distinct tokens:
#   W0: all E                      -> 12 / 12 = 1
#   W1: 2, 3, 6 E, 7 F             -> the 6 pairs among the three Es -> 6 / 12 = 0.5
#   W2: 8, 9 E, 12, 13 F           -> 4 pairs (8-9, 12-13 both ways) -> 4 / 12 = 1/3
#   W3: 10 E, 11 F, 14 W, 15 S     -> 10-14 and 11-15 at -1, both ways -> -4 / 12 = -1/3
FEATURES = [E, E, E, E, E, E, E, F, E, E, E, F, F, F, W, S]
WINDOWS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def grid_signals(rows, cols, features, extra=0, groups=1):
    """``groups`` crops of ``rows × cols`` patches, row-major, then ``extra`` tokens without a patch."""
    cells = [(g, r, c) for g in range(groups) for r in range(rows) for c in range(cols)] + [(-1, -1, -1)] * extra
    return Signals(valid=torch.ones(1, len(cells), dtype=torch.bool), grid=torch.tensor(cells)[None],
                   features=torch.tensor(features, dtype=torch.float32)[None])


def check(sel, n, k):
    """What every result holds: within the budget, disjoint, uniform rows summing to 1, anchor = last member."""
    assert 1 <= len(sel.kept) + sel.num_merged <= k
    assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
    assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
    assert (sel.weights > 0).sum(dim=0).le(1).all() and not sel.weights[:, sel.kept].any()
    for row, anchor in zip(sel.weights, sel.anchors.tolist()):
        members = torch.nonzero(row).flatten()
        assert anchor == int(members.max()) and torch.allclose(row[members], torch.full((len(members),), 1 / len(members)))
        assert int(members.max()) < n


def merges(sel):
    return [torch.nonzero(row).flatten().tolist() for row in sel.weights]


def test_window_scores_by_hand():
    unit = torch.nn.functional.normalize(torch.tensor(FEATURES, dtype=torch.float64), dim=-1)
    assert torch.allclose(window_scores(unit, WINDOWS), torch.tensor([1, 0.5, 1 / 3, -1 / 3], dtype=torch.float64))
    # a zero vector counts 0 with every other token and is not its own pair: 3 Es and a zero -> 6 / 12
    unit[7] = 0
    assert window_scores(unit, [[2, 3, 6, 7]]).item() == 0.5


def test_budget_merges_the_best_windows_into_their_last_token():
    s = grid_signals(4, 4, FEATURES)
    # budget 13: 16 - 13 = 3 = one 2×2 window: W0 (score 1), its mean in slot 5 (bottom-right)
    (sel,) = MUSTDROP.selections(s, 13 / 16, window=2)
    assert sel.anchors.tolist() == [5] and sel.kept.tolist() == [2, 3, 6, 7] + list(range(8, 16))
    expected = torch.zeros(1, 16)
    expected[0, [0, 1, 4, 5]] = 0.25
    assert torch.equal(sel.weights, expected)
    assert torch.allclose(sel.weights @ s.features[0], torch.tensor([[1.0, 0.0]]))
    # budget 12: 4 to save, one window saves 3 -> two windows, W0 and W1 (0.5): 10 tokens, under the budget
    (sel,) = MUSTDROP.selections(s, 12 / 16, window=2)
    assert sel.anchors.tolist() == [5, 7] and merges(sel) == WINDOWS[:2] and sel.kept.tolist() == list(range(8, 16))
    # budget 7: 9 to save -> three windows, W3 (-1/3) left as it is
    (sel,) = MUSTDROP.selections(s, 7 / 16, window=2)
    assert sel.anchors.tolist() == [5, 7, 13] and sel.kept.tolist() == [10, 11, 14, 15]
    # budget 4 (a quarter): every window
    (sel,) = MUSTDROP.selections(s, 0.25, window=2)
    assert sel.anchors.tolist() == [5, 7, 13, 15] and merges(sel) == WINDOWS and len(sel.kept) == 0


def test_keep_all_merges_nothing_in_budget_mode():
    (sel,) = MUSTDROP.selections(grid_signals(4, 4, FEATURES, extra=2), 1.0, window=2)
    assert sel.kept.tolist() == list(range(18)) and sel.num_merged == 0


def test_ties_go_to_the_window_that_comes_first():
    # W0 = 0, 1, 4, 5 -> E, E, E, F: 0.5; W1 = 2, 3, 6, 7 -> E, E, E, F: 0.5; W2 and W3 all E: 1
    features = [E, E, E, E, E, F, E, F, E, E, E, E, E, E, E, E]
    (sel,) = MUSTDROP.selections(grid_signals(4, 4, features), 13 / 16, window=2)
    assert sel.anchors.tolist() == [13]  # W2 before W3
    (sel,) = MUSTDROP.selections(grid_signals(4, 4, features), 7 / 16, window=2)
    assert sel.anchors.tolist() == [5, 13, 15]  # then W0 before W1


def test_partial_windows_are_never_merged():
    # 3×3 grid, 2×2 windows: {0,1,3,4} full; {2,5}, {6,7}, {8} partial. Budget 6 (ceil(0.6 · 9)): one window
    features = [E] * 9
    (sel,) = MUSTDROP.selections(grid_signals(3, 3, features), 0.6, window=2)
    assert sel.anchors.tolist() == [4] and sel.kept.tolist() == [2, 5, 6, 7, 8]
    # budget 5: merging the only full window leaves 6 -> side 3, one full window of all 9 tokens, in slot 8
    (sel,) = MUSTDROP.selections(grid_signals(3, 3, features), 5 / 9, window=2)
    assert sel.anchors.tolist() == [8] and merges(sel) == [list(range(9))] and len(sel.kept) == 0


def test_the_window_grows_until_the_budget_is_met():
    # 4×4 + 2 newlines (18 tokens). Budget 15: W0 only, newlines kept
    s = grid_signals(4, 4, FEATURES + [E, E], extra=2)
    (sel,) = MUSTDROP.selections(s, 15 / 18, window=2)
    assert sel.anchors.tolist() == [5] and sel.kept.tolist()[-2:] == [16, 17] and len(sel.kept) == 14
    # budget 3: side 2 leaves 18 - 12 = 6, side 3 (one full window {0,1,2,4,5,6,8,9,10}) 18 - 8 = 10,
    # side 4 (the whole crop) 18 - 15 = 3: one token in slot 15 and the two newlines
    (sel,) = MUSTDROP.selections(s, 3 / 18, window=2)
    assert sel.anchors.tolist() == [15] and merges(sel) == [list(range(16))] and sel.kept.tolist() == [16, 17]
    # window 3 from the start: side 3 leaves 10 > 9 (budget ceil(0.5 · 18)), side 4 meets it
    (sel,) = MUSTDROP.selections(s, 0.5, window=3)
    assert sel.anchors.tolist() == [15] and sel.kept.tolist() == [16, 17]
    # budget 2: no side meets it (3 at best): the crop is one token and the newlines, which do not fit, go
    (sel,) = MUSTDROP.selections(s, 2 / 18, window=2)
    assert sel.anchors.tolist() == [15] and merges(sel) == [list(range(16))] and len(sel.kept) == 0


def test_more_crops_than_the_budget_merges_crops_together():
    # 3 crops of 2×2 (12 tokens), window 2: each crop is one full window, 3 tokens at best.
    s = grid_signals(2, 2, [E] * 12, groups=3)
    (sel,) = MUSTDROP.selections(s, 0.25, window=2)
    assert sel.anchors.tolist() == [3, 7, 11] and merges(sel) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # budget 2: ceil(3 / 2) = 2 crops per token: crops 0 and 1 (slot 7), crop 2 (slot 11)
    (sel,) = MUSTDROP.selections(s, 2 / 12, window=2)
    assert sel.anchors.tolist() == [7, 11] and merges(sel) == [list(range(8)), [8, 9, 10, 11]]
    assert torch.allclose(sel.weights[0, :8], torch.full((8,), 1 / 8))
    # budget 1: everything in one token
    (sel,) = MUSTDROP.selections(s, 1 / 12, window=2)
    assert sel.anchors.tolist() == [11] and merges(sel) == [list(range(12))] and len(sel.kept) == 0


def test_a_crop_that_is_not_square_falls_back_to_one_token_keeping_newlines_that_fit():
    # crop 2×3 + a newline (7 tokens), window 2; side 3 = the longer side. Budget 3: side 2 merges {0,1,3,4}
    # ({2,5} is partial) -> 4; side 3: one window of 6 < 9 tokens, not full -> fallback: the crop in slot 5,
    # the newline kept (2 tokens, under the budget)
    s = grid_signals(2, 3, [E] * 7, extra=1)
    (sel,) = MUSTDROP.selections(s, 3 / 7, window=2)
    assert sel.anchors.tolist() == [5] and merges(sel) == [list(range(6))] and sel.kept.tolist() == [6]
    # budget 4: side 2 meets it
    (sel,) = MUSTDROP.selections(s, 4 / 7, window=2)
    assert sel.anchors.tolist() == [4] and sel.kept.tolist() == [2, 5, 6]


def test_llmc_retained_tokens_on_a_llava_grid():
    # 24×24, 3×3 windows: llmc's fix_r = (577 - retained) // 8 -> 48, 56, 64 for 192, 128, 64, ours the same
    cells = torch.tensor([(0, r, c) for r in range(24) for c in range(24)])[None]
    gen = torch.Generator().manual_seed(0)
    s = Signals(valid=torch.ones(1, 576, dtype=torch.bool), grid=cells, features=torch.randn(1, 576, 4, generator=gen))
    for retained, r in ((192, 48), (128, 56), (64, 64)):
        (sel,) = MUSTDROP.selections(s, retained / 576)
        assert sel.num_merged == r and len(sel.kept) + sel.num_merged == retained
        check(sel, 576, retained)


def test_adaptive_mode_threshold_and_budget():
    s = grid_signals(4, 4, FEATURES)
    # keep 1.0: windows scoring at least 0.5 (inclusive): W0, W1
    (sel,) = MUSTDROP.selections(s, 1.0, window=2, mode="adaptive", spatial_threshold=0.5)
    assert sel.anchors.tolist() == [5, 7] and len(sel.kept) == 8
    (sel,) = MUSTDROP.selections(s, 1.0, window=2, mode="adaptive", spatial_threshold=0.6)
    assert sel.anchors.tolist() == [5]
    (sel,) = MUSTDROP.selections(s, 1.0, window=2, mode="adaptive", spatial_threshold=-0.5)
    assert sel.anchors.tolist() == [5, 7, 13, 15]
    # the budget needs more windows than the threshold gives: budget 7 -> three windows, not one
    (sel,) = MUSTDROP.selections(s, 7 / 16, window=2, mode="adaptive", spatial_threshold=0.6)
    assert sel.anchors.tolist() == [5, 7, 13]
    # budget mode ignores the threshold
    (sel,) = MUSTDROP.selections(s, 1.0, window=2, spatial_threshold=-0.5)
    assert sel.num_merged == 0


def test_padding_never_merged_and_batched_equals_per_sample():
    # sample 1: a 2×2 crop, padded to 16 with tokens identical to its own (which would merge if they counted)
    a, b = grid_signals(4, 4, FEATURES), grid_signals(2, 2, [E, E, F, F])
    grid = torch.full((2, 16, 3), -1)
    grid[0], grid[1, :4] = a.grid[0], b.grid[0]
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0], valid[1, :4] = True, True
    features = torch.stack([a.features[0], torch.tensor([E, E, F, F] + [E] * 12)])
    for ratio, mode in ((0.5, "budget"), (0.75, "budget"), (1.0, "adaptive")):
        both = MUSTDROP.selections(Signals(valid=valid, grid=grid, features=features), ratio, window=2, mode=mode,
                                   spatial_threshold=0.3)
        alone = [MUSTDROP.selections(x, ratio, window=2, mode=mode, spatial_threshold=0.3)[0] for x in (a, b)]
        for x, y in zip(both, alone):
            assert x.kept.tolist() == y.kept.tolist() and x.anchors.tolist() == y.anchors.tolist()
            width = y.weights.shape[1]
            assert torch.equal(x.weights[:, :width], y.weights) and not x.weights[:, width:].any()
        assert max(both[1].slots.tolist()) < 4
    # sample 1 at 0.5: budget 2 -> its one window {0,1,2,3} (E, E, F, F: 4 of 12 pairs at 1 -> 1/3), slot 3
    both = MUSTDROP.selections(Signals(valid=valid, grid=grid, features=features), 0.5, window=2)
    assert both[1].anchors.tolist() == [3] and len(both[1].kept) == 0
    # adaptive at 0.3 merges it too (1/3 >= 0.3)
    both = MUSTDROP.selections(Signals(valid=valid, grid=grid, features=features), 1.0, window=2, mode="adaptive",
                               spatial_threshold=0.3)
    assert both[1].anchors.tolist() == [3] and both[0].anchors.tolist() == [5, 7, 13]


def test_budget_respected_over_ratios_windows_and_modes():
    gen = torch.Generator().manual_seed(0)
    cells = [(g, r, c) for g in range(2) for r in range(5) for c in range(7)] + [(-1, -1, -1)] * 3
    n = len(cells)
    s = Signals(valid=torch.ones(1, n, dtype=torch.bool), grid=torch.tensor(cells)[None],
                features=torch.randn(1, n, 3, generator=gen))
    for mode in ("budget", "adaptive"):
        for window in (2, 3, 8):
            for k in range(1, n + 1):
                (sel,) = MUSTDROP.selections(s, k / n, window=window, mode=mode)
                check(sel, n, budget(n, k / n))


def test_options_are_checked():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "mustdrop", "options": options}}
        )

    assert load({"window": 2, "mode": "adaptive", "spatial_threshold": 0.8}).pruning.options == {
        "window": 2, "mode": "adaptive", "spatial_threshold": 0.8}
    for bad in ({"window": 1}, {"window": 9}, {"spatial_threshold": 1.5}, {"spatial_threshold": -1.5},
                {"mode": "fixed"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load(bad)
    assert {name: opt.default for name, opt in MUSTDROP.options.items()} == {
        "window": 3, "spatial_threshold": 0.6, "mode": "budget"}
    s = grid_signals(4, 4, FEATURES)
    with pytest.raises(ValueError, match="mode"):
        MUSTDROP.selections(s, 0.5, mode="fixed")
    with pytest.raises(ValueError, match="window"):
        MUSTDROP.selections(s, 0.5, window=1)


def test_nothing_on_a_grid_keeps_the_first_tokens():
    s = Signals(valid=torch.ones(1, 4, dtype=torch.bool), grid=torch.full((1, 4, 3), -1),
                features=torch.randn(1, 4, 2))
    (sel,) = MUSTDROP.selections(s, 0.5)
    assert sel.kept.tolist() == [0, 1] and sel.num_merged == 0
