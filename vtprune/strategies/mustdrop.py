"""MustDrop (vision stage): the most self-similar windows of the patch grid, each merged into one token.

MustDrop (Liu, Shi, Hong, Hu, Yin, Zhang, arXiv 2411.10803, 2024, "Multi-Stage Vision Token Dropping: Towards
Efficient Multimodal Large Language Model"). Rules read (not copied) from LightCompress (ModelTC/llmc),
``llmc/compression/token_reduction/mustdrop.py`` (``conditional_pooling``, ``merge_wavg``, ``spatial_merge_hook``)
and its defaults in ``configs/sparsification/methods/MustDrop/mustdrop.yml``; checked against the authors' code,
github.com/liuting20/MustDrop, ``llava/model/multimodal_encoder/local_merge.py`` (the same ``conditional_pooling``):

- each crop's patch grid is cut into ``s × s`` windows (``s`` = option ``window``; 3 in llmc's config and in the
  authors' code); a window's score is the mean cosine similarity over its ordered pairs of distinct tokens;
- the ``r`` highest-scoring windows are merged, each into one token, the uniform mean of its tokens (``merge_wavg``
  with no sizes), every other token stays as it is;
- ``r``: llmc's ``retained_tokens`` gives ``r = (T − retained) // (s² − 1)``, ``T`` the tower's tokens with its
  CLS; without it, the number of windows scoring at least ``spatial_threshold`` (0.6 in llmc's config).

Only the vision-encoding stage is implemented, the one llmc implements, so this is a pre-LLM merge, not a
multi-stage strategy. The paper's prefilling stage (dual-attention filtering of vision tokens by the text's
attention at LLM layers 2, 6, 10, 14, protecting a "key set" of top CLS-attention tokens) and its decoding stage
(the KV cache cut to the tokens the prefill kept) are in the authors' repository for LLaVA-1.5 at batch size 1,
not in llmc; they would be an in-LLM, multi-stage strategy of their own with threshold-driven (not budgeted)
counts, and vtprune has no decode-time cache policy.

vtprune's budget ``B`` (option ``mode``): ``"budget"`` (default) merges the fewest windows, best score first,
that bring the sample's ``N`` valid tokens to at most ``B``: ``r = ceil((N − B) / (s² − 1))`` when every window
is full (llmc's rule for ``retained_tokens`` = ``B``, see below). ``"adaptive"`` is llmc's threshold rule, but
never fewer windows than the budget needs, so at most ``B`` tokens. If merging every full window still leaves more
than ``B`` (keep ratios below about ``1 / s²``), the window side grows (``s + 1``, ``s + 2``, ... up to the
largest crop side) to the first side that meets ``B``; if none does (more crops and patch-less tokens than ``B``,
or crops that are not square), each crop becomes one token and the patch-less tokens are dropped unless they all
fit, and where crops alone outnumber ``B`` consecutive crops are merged together, as ``pool`` does.

Deliberate differences:

- similarity: on ``features`` (projector outputs), not the vision tower's select-layer hidden states llmc scores,
  which vtprune does not expose as a signal; float64. The merge itself averages the tower's outputs before the
  projector (``merge_space="vision"``), as llmc merges the select layer's hidden states; the authors' own code
  merges after the tower's first layer with threshold 0.8;
- windows come from ``grid`` (crop, row // s, column // s), per crop; a window with fewer than ``s²`` tokens (at
  grid edges not divisible by ``s``, in LLaVA-NeXT's unpadded crops) is never merged; llmc asserts a square grid
  that ``s`` divides. Patch-less tokens (LLaVA-NeXT's row newlines) are never merged and count in ``N``; where
  several frames share one grid, a window holds more than ``s²`` tokens and merges them all;
- ``r`` is the ceiling above, not llmc's floor with ``T = N + 1``, which can leave a few tokens over the target
  (576 patches, 2 × 2, 128 retained: 129); the growing window and the crop fallback are vtprune's;
- placement: every token keeps its slot; a merged token takes the slot of its window's last token in sequence order
  (the bottom-right cell on a row-major grid, llmc's ``dst``); llmc orders them ``[CLS, merged..., unmerged...]``. On LLaVA-NeXT llmc does not merge at
  all but keeps each window's ``dst`` token as it is (its ``index_masks``); here every model gets the mean;
- batching and padding: each sample separately over its valid tokens (llmc's adaptive ``r`` is the minimum over
  the batch, i.e. over a LLaVA-NeXT image's crops); on multi-crop models one ranking and one budget over the
  sample's whole packed sequence, where llmc merges each crop by the same ``r``. Ties in the window scores → the
  window whose first token comes first (stable sort), where ``torch.topk`` leaves them unspecified.
"""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, Selection, register_strategy
from vtprune.strategies.pool import pooled, windows

MODES = ("budget", "adaptive")


def window_scores(unit: torch.Tensor, members: list[list[int]]) -> torch.Tensor:
    """Mean cosine similarity over each window's ordered pairs of distinct tokens (``unit``: [N, D] unit rows)."""
    scores = []
    for m in members:
        sims = unit[m] @ unit[m].T
        # subtracting the diagonal, not assuming it is 1: a zero vector's self-similarity is 0, as llmc's mask makes it
        scores.append((sims.sum() - sims.diagonal().sum()) / (len(m) * (len(m) - 1)))
    return torch.stack(scores) if scores else unit.new_zeros(0)


def merge_windows(unit, patch, cells, n, k, side, mode, threshold):
    """Windows merged at side ``side`` and the patch tokens left alone, or None if ``side`` cannot meet ``k``.

    ``patch``: the sample's patch tokens (indices), ``cells``: their ``grid`` rows, ``n``: its valid tokens."""
    groups = [[int(patch[i]) for i in m] for m in windows(cells, side).values()]
    full = [m for m in groups if len(m) >= side * side]  # a grid's frames may share a window: more than side²
    saved = torch.tensor([len(m) - 1 for m in full], dtype=torch.long).cumsum(0)
    if n - (int(saved[-1]) if len(full) else 0) > k:
        return None
    scores = window_scores(unit, full)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    r = int((saved < n - k).sum()) + 1 if n > k else 0
    if mode == "adaptive":
        r = max(r, int((scores >= threshold).sum()))
    merged = [full[i] for i in order[:r]]
    taken = {t for m in merged for t in m}
    return merged, [t for m in groups for t in m if t not in taken]


@register_strategy(
    "mustdrop",
    needs=("grid", "features"),
    merges=True,
    merge_space="vision",
    fills_budget=False,  # whole windows: at most the budget, often fewer
    options={
        "window": Option(3, help="side of the square windows merged (grows where the budget needs it)",
                         bounds=(2, 8)),
        "spatial_threshold": Option(0.6, help="'adaptive' mode: merge every window whose mean cosine similarity is "
                                    "at least this", bounds=(-1.0, 1.0)),
        "mode": Option("budget", help="'budget': the fewest windows that meet the budget; 'adaptive': llmc's "
                       "threshold count, at most the budget", choices=MODES),
    },
)
def keep_mustdrop(signals, budgets, window=3, spatial_threshold=0.6, mode="budget"):
    """MustDrop (vision stage): the most self-similar grid windows merged, each into one token (a merge)."""
    if mode not in MODES:
        raise ValueError(f"mustdrop: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if window < 2:
        raise ValueError(f"mustdrop: window must be 2 or more, got {window}")
    unit = F.normalize(signals.features.double(), dim=-1)
    out = []
    for b, k in enumerate(budgets.tolist()):
        valid, grid = signals.valid[b], signals.grid[b]
        index = torch.nonzero(valid).flatten()
        n = len(index)
        has_patch = grid[index, 0] >= 0
        patch, patchless = index[has_patch], index[~has_patch].tolist()
        if not len(patch):  # nothing on a grid to merge
            out.append(Selection(index[:k]))
            continue
        side = int(grid[patch, 1:].max()) + 1
        chosen = None
        for s in range(window, max(window, side) + 1):
            chosen = merge_windows(unit[b], patch, grid[patch], n, k, s, mode, spatial_threshold)
            if chosen:
                break
        if chosen:
            merged, alone = chosen
        else:  # no window side meets the budget: whole crops, as pool's last resort
            crops = [[int(patch[i]) for i in m] for m in windows(grid[patch], side).values()]
            if len(crops) + len(patchless) > k:
                patchless = []
            size = -(-len(crops) // k)
            merged, alone = [[t for c in crops[i : i + size] for t in c] for i in range(0, len(crops), size)], []
        # pooled puts a merge in its first member's slot: listed last-first, that is the window's last token
        members = [sorted(m, reverse=True) for m in merged] + [[t] for t in alone]
        out.append(pooled(members, patchless, width=valid.shape[0], device=valid.device))
    return out
