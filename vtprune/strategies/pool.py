"""pool: average pooling of the visual-token grid, a merge baseline.

Each crop's patch grid is cut into ``s × s`` windows (row // s, column // s); each window becomes one token, the
mean of its tokens, in the slot of its first token (so it keeps that token's position). ``s`` is the smallest
stride whose windows, plus the tokens without a patch (LLaVA-NeXT's row newlines, a kept CLS), fit the budget: 2×2
at keep 0.25 on a square grid, 1 (nothing merged) at keep 1.0. Strides are square, so the achieved fraction is
the nearest one at or below the target that a square stride reaches (keep 0.5 pools 2×2 too); reports use the
achieved fraction. Where even one window per crop and the patch-less tokens do not fit, the patch-less tokens go
first, then the crops are pooled together into as few tokens as the budget allows.

Not from a paper's code: VTC-Bench (arXiv 2510.07143) and UniPruneBench (arXiv 2511.02650) report pooling as the
simple baseline that many methods fail to beat; this is that baseline over each family's own grid (``grid``).
A window of a single token is kept, not merged.
"""

import torch

from vtprune.strategies.base import Selection, register_strategy


def windows(grid: torch.Tensor, stride: int) -> dict[tuple, list[int]]:
    """Token indices per ``stride × stride`` window of each group's grid, windows in order of their first token."""
    out: dict[tuple, list[int]] = {}
    for i, (group, row, col) in enumerate(grid.tolist()):
        out.setdefault((group, row // stride, col // stride), []).append(i)
    return out


def pooled(members: list[list[int]], patchless: list[int], width: int, device) -> Selection:
    """Keep single tokens and ``patchless``; every larger window is one merged token at its first index."""
    kept = [m[0] for m in members if len(m) == 1] + patchless
    merged = [m for m in members if len(m) > 1]
    weights = torch.zeros(len(merged), width, device=device)
    for row, m in enumerate(merged):
        weights[row, m] = 1.0 / len(m)
    return Selection(torch.tensor(kept, dtype=torch.long, device=device),
                     torch.tensor([m[0] for m in merged], dtype=torch.long, device=device), weights)


@register_strategy("pool", needs=("grid",), merges=True, fills_budget=False)
def keep_pool(signals, budgets):
    """Average pooling of each crop's token grid with the smallest square stride that meets the budget (a merge)."""
    out = []
    for b, k in enumerate(budgets.tolist()):
        valid, grid = signals.valid[b], signals.grid[b]
        index = torch.nonzero(valid).flatten()
        has_patch = grid[index, 0] >= 0
        patch, patchless = index[has_patch], index[~has_patch].tolist()
        if not len(patch):  # nothing on a grid: keep the first tokens
            out.append(Selection(index[:k]))
            continue
        side = int(grid[patch, 1:].max()) + 1
        chosen = None
        for keep_patchless in (patchless, []):
            for stride in range(1, side + 1):
                w = windows(grid[patch], stride)
                if len(w) + len(keep_patchless) <= k:
                    chosen = ([[int(patch[i]) for i in m] for m in w.values()], keep_patchless)
                    break
            if chosen:
                break
        if chosen is None:  # more crops than the budget: pool crops together, in order, into k tokens
            per_crop = [[int(patch[i]) for i in m] for m in windows(grid[patch], side).values()]
            size = -(-len(per_crop) // k)
            chosen = ([sum(per_crop[i : i + size], []) for i in range(0, len(per_crop), size)], [])
        out.append(pooled(*chosen, width=valid.shape[0], device=valid.device))
    return out
