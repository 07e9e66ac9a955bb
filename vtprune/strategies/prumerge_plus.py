"""PruMerge+: PruMerge's CLS-attention outliers plus spatially uniform samples, each merged with its neighbours.

LLaVA-PruMerge (Shang, Cai, Xu, Lee, Yan, ICCV 2025, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388). Rules read (not copied) from the authors' code, github.com/42Shawn/
LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py`` (``outlier_dectection``,
``CLIPVisionTower.token_prune_merge_advanced_plus``, the variant its ``forward`` runs, with ``if_adaptive=True``):

- selection: PruMerge's ``m`` IQR outliers (see ``prumerge``), then the tokens at flat positions ``0, s, 2s, ...``
  of the row-major patch grid, ``s = int(int(N / m) / 3)`` (``N`` tokens), those already outliers left out:
  about ``3m`` more tokens spread over the image;
- merge and extra token: PruMerge's (each selected token with its 32 most similar tokens, weighted by CLS
  attention; one more token from every unselected one), on the vision tower's outputs (``merge_space="vision"``).

Budget (option ``mode``): ``"budget"`` (default) fills exactly ``min(B, valid)`` slots, ``B`` vtprune's budget:
the outliers first (in CLS order, capped at the slots), then the selection's other ``r`` tokens evenly spaced over
the remaining patch tokens in grid order (positions ``floor(i · L / r)`` of those ``L``: a constant stride from
the first, as theirs, at the pitch the budget allows), past the patch tokens the rest by CLS attention; plus the
extra token as in ``prumerge``. ``"adaptive"`` is the authors' list (plus the extra token) where it fits in ``B``;
where it does not, the ``"budget"`` selection of ``B`` slots (so the budget is an upper bound).

Deliberate differences, besides ``prumerge``'s (scores, similarity on ``features``, normalised weights,
placement, at least one outlier, ties → the lower index, per-sample quartiles):

- grid order: the sample's patch tokens (``grid`` ≥ 0) by (crop, row, column), each crop's grid row-major and the
  crops in id order, the stride running on from one crop into the next; the authors have one 24 × 24 grid. Their
  ``arange(0, 575, s)`` leaves out the last patch when ``s`` divides 575; here any patch can be sampled;
- ``N`` is the sample's valid token count (newlines included on multi-crop models) and ``s = max(1, (N // m) // 3)``
  in integers: theirs is ``int(1 / (m / N))`` in floating point, and fails with no outlier or ``s`` = 0;
- ``"budget"`` spacing: over the patches that are not outliers, so that exactly ``r`` are sampled; theirs lands on
  every patch and then drops the outliers. Where the outliers fill the slots, it is ``prumerge``'s selection;
- their training branch (``if_adaptive=False``: the top ``N / 8`` plus a stride-8 grid from position 4, repeats
  kept) is not followed.
"""

import torch

from vtprune.strategies.base import Selection, register_strategy
from vtprune.strategies.prumerge import NEIGHBOURS, check, iqr_outliers, merged, options, sample_inputs


def grid_order(grid: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens with a patch (``grid`` [n, 3], -1 without) in (group, row, column) order."""
    patch = torch.nonzero(grid[:, 0] >= 0).flatten()
    if not len(patch):
        return patch
    g, r, c = grid[patch].T
    key = (g * (int(r.max()) + 1) + r) * (int(c.max()) + 1) + c
    return patch[torch.sort(key, stable=True).indices]


def spread(outliers: torch.Tensor, patches: torch.Tensor, order: torch.Tensor, count: int, n: int) -> torch.Tensor:
    """``count`` tokens: the outliers first, then evenly spaced patch tokens, then the rest in attention ``order``."""
    first = outliers[:count]
    taken = torch.zeros(n, dtype=torch.bool, device=order.device)
    taken[first] = True
    others = patches[~taken[patches]]
    r = min(count - len(first), len(others))
    even = others[torch.arange(r, device=order.device) * len(others) // r] if r else others[:0]
    taken[even] = True
    return torch.cat([first, even, order[~taken[order]][: count - len(first) - r]])


@register_strategy("prumerge_plus", needs=("cls_attention", "features", "grid"), options=options("PruMerge+"),
                   merge_space="vision", merges=True, fills_budget=lambda options: options["mode"] == "budget")
def keep_prumerge_plus(signals, budgets, mode="budget", neighbours=NEIGHBOURS, extra_token=True):
    """PruMerge+: CLS-attention outliers plus spatially uniform tokens, each merged with its nearest tokens."""
    check("prumerge_plus", mode, neighbours)
    out = []
    for b, k in enumerate(budgets.tolist()):
        index, attention, unit = sample_inputs(signals, b)
        n = len(index)
        if mode == "budget" and k >= n:  # room for every token: nothing pruned, nothing merged (keep 1.0 ≡ unpruned)
            out.append(Selection(index, index.new_zeros(0), torch.zeros(0, signals.valid.shape[1])))
            continue
        order = torch.sort(attention, descending=True, stable=True).indices
        outliers = order[: max(1, iqr_outliers(attention))]
        patches = grid_order(signals.grid[b, index])
        slots = min(k, n)
        pick = lambda c, o=outliers, p=patches, r=order, n=n: spread(o, p, r, c, n)
        if mode == "adaptive" and n:
            stride = max(1, n // len(outliers) // 3)
            samples = patches[::stride]
            own = torch.cat([outliers, samples[~torch.isin(samples, outliers)]])
            if len(own) + int(extra_token) <= k:
                slots = min(len(own) + int(extra_token), n)
                pick = lambda c, own=own: own[:c]
        out.append(merged(attention, unit, pick, slots, neighbours, extra_token, index, signals.valid.shape[1]))
    return out
