"""pool on hand-made grids: the stride that meets the budget, window means as merges, patch-less tokens."""

import torch

from vtprune.strategies import STRATEGIES, Signals, budget

POOL = STRATEGIES.get("pool")


def grid_signals(rows, cols, extra=0, groups=1):
    """``groups`` crops of ``rows × cols`` patches, row-major, then ``extra`` tokens without a patch."""
    cells = [(g, r, c) for g in range(groups) for r in range(rows) for c in range(cols)] + [(-1, -1, -1)] * extra
    grid = torch.tensor(cells)[None]
    return Signals(valid=torch.ones(1, len(cells), dtype=torch.bool), grid=grid)


def test_keep_all_pools_nothing():
    s = grid_signals(4, 4, extra=2)
    (sel,) = POOL.selections(s, 1.0)
    assert sel.kept.tolist() == list(range(18)) and sel.num_merged == 0


def test_two_by_two_at_a_quarter():
    # 4×4 grid, budget 4: stride 2 gives the windows {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    (sel,) = POOL.selections(grid_signals(4, 4), 0.25)
    assert sel.kept.tolist() == [] and sel.anchors.tolist() == [0, 2, 8, 10]
    expected = torch.zeros(4, 16)
    for row, window in enumerate([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]):
        expected[row, window] = 0.25
    assert torch.equal(sel.weights, expected)


def test_square_strides_only_achieve_what_they_reach():
    # budget 8 of 16: stride 2 (4 windows) is the smallest stride that fits; stride 1 (16) does not
    (sel,) = POOL.selections(grid_signals(4, 4), 0.5)
    assert sel.num_merged == 4 and len(sel.kept) == 0


def test_partial_windows_and_single_tokens():
    # 3×3 grid, budget 4 (ceil(0.4 · 9)): stride 2 -> {0,1,3,4}, {2,5}, {6,7}, {8}; {8} alone is kept as it is
    (sel,) = POOL.selections(grid_signals(3, 3), 0.4)
    assert sel.kept.tolist() == [8] and sel.anchors.tolist() == [0, 2, 6]
    assert torch.allclose(sel.weights[1], torch.tensor([0, 0, 0.5, 0, 0, 0.5, 0, 0, 0]))


def test_patchless_tokens_kept_while_they_fit_then_dropped():
    # 2 crops of 2×2 + 2 newlines, 10 tokens. Budget 4: one window per crop (stride 2) + 2 newlines = 4.
    s = grid_signals(2, 2, extra=2, groups=2)
    (sel,) = POOL.selections(s, 0.4)
    assert sel.kept.tolist() == [8, 9] and sel.anchors.tolist() == [0, 4]
    # budget 2 (0.2): the newlines go, each crop is one token
    (sel,) = POOL.selections(s, 0.2)
    assert sel.kept.tolist() == [] and sel.anchors.tolist() == [0, 4]
    # budget 1 (0.1): both crops pooled into one token over all 8 patches
    (sel,) = POOL.selections(s, 0.1)
    assert sel.anchors.tolist() == [0] and torch.allclose(sel.weights[0, :8], torch.full((8,), 1 / 8))


def test_padding_never_pooled_and_batched_equals_per_sample():
    a, b = grid_signals(4, 4), grid_signals(2, 2)
    grid = torch.full((2, 16, 3), -1)
    grid[0], grid[1, :4] = a.grid[0], b.grid[0]
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0], valid[1, :4] = True, True
    both = POOL.selections(Signals(valid=valid, grid=grid), 0.25)
    alone = [POOL.selections(a, 0.25)[0], POOL.selections(b, 0.25)[0]]
    for x, y in zip(both, alone):
        assert x.kept.tolist() == y.kept.tolist() and x.anchors.tolist() == y.anchors.tolist()
        assert torch.equal(x.weights[:, : y.weights.shape[1]], y.weights)
        assert not x.weights[:, y.weights.shape[1] :].any()
    assert both[1].anchors.tolist() == [0]


def test_budget_respected_over_ratios():
    s = grid_signals(5, 7, extra=3, groups=2)
    n = 73
    for r in [0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0]:
        (sel,) = POOL.selections(s, r)
        assert 1 <= len(sel.kept) + sel.num_merged <= budget(n, r)
        assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
        assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
