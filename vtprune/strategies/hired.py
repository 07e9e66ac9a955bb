"""HiRED: the budget split between the full-image view and the crops, then top CLS attention in each.

HiRED (Arif et al., AAAI 2025, "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models", arXiv 2408.10945). Rules followed from the authors' code, github.com/hasanar1f/HiRED,
``transformers/src/transformers/models/llava_next/modeling_llava_next.py`` (``HiRED_token_selection``,
``HiRED_sub_img_budgets``, ``pack_HiRED_image_features``), single-view version in ``.../llava/modeling_llava.py``,
default ``alpha = 0.5`` from ``accuracy_benchmarks/*.sh`` and ``run_HiRED_sys_report.py``:

- the base (full-image) view gets ``floor(alpha · B)`` of the budget ``B``, at most its size; the crops share the
  rest, at most their total size;
- the crops' shares: the base view's top ``floor(n0 · (1 − alpha))`` tokens by CLS attention are counted in ``C``
  equal consecutive chunks of the base view's (row-major) token order, chunk ``i`` standing for crop ``i`` (their
  reshape of the base view to ``[rows of crops, columns of crops, -1]``); each crop's share is proportional to its
  count;
- within each partition the top tokens by CLS attention; newline tokens are dropped (their packing passes
  ``image_newline=None``);
- a single view (LLaVA-1.5) keeps its top ``B`` by CLS attention.

Group 0 is taken as the base view and the other groups as the crops, in id order; a group other than 0 whose every
token has CLS attention exactly 0 has no patch behind it (LLaVA-NeXT's row newlines) and is no crop.

Deliberate differences:

- one CLS attention signal, the vision layer producing the features (on LLaVA-NeXT layer 22 of 24, their selection
  layer); they count the base view's top tokens by the first layer's attention;
- the chunk-to-crop map is theirs, computable from the token order alone: it matches the crop's image region when
  the crops are stacked vertically, not on a 2 × 2 grid (there chunk 0 is the top quarter of rows). Splitting by
  each crop's own total CLS attention is no alternative: a softmax per crop makes those totals all about 1;
- exactly ``B`` tokens: they floor every crop's share (the image gets fewer), vtprune hands out the remainder by
  largest remainders (ties → the lower crop); a share past a crop's size goes to the other crops by their counts
  (by their sizes when none counts), one the crops cannot hold goes back to the base view; if no patch tokens are
  left, newline tokens fill the rest in index order;
- ``B`` is vtprune's ``ceil(keep_ratio · valid tokens)`` over the packed, unpadded sequence with its newlines; they
  take ``int(rate · crops · 576)`` and select among every crop's 576 tokens before unpadding, so part of their
  share can fall on padding that unpadding then removes;
- ties → the lower index (stable sorts); each sample independently, padding never a candidate.
"""

import math

import torch

from vtprune.strategies.base import Option, register_strategy, topk_valid


def chunk_counts(base_scores: torch.Tensor, crops: int, alpha: float) -> list[int]:
    """How many of the base view's top ``floor(n0 · (1 − alpha))`` tokens lie in each of ``crops`` equal chunks."""
    n0 = len(base_scores)
    if crops == 0 or n0 == 0:
        return [0] * crops
    counted = math.floor(round(n0 * (1 - alpha), 6))
    top = topk_valid(base_scores, torch.ones_like(base_scores, dtype=torch.bool), counted)
    return torch.bincount(top * crops // n0, minlength=crops).tolist()


def weighted_split(weights: list[int], caps: list[int], k: int) -> list[int]:
    """Split ``k <= sum(caps)`` in proportion to integer ``weights``, never above ``caps``.

    A group whose proportional share reaches its cap gets the cap and the rest is split again over the others
    (by their sizes when none of them has weight); then floors plus largest remainders, ties → the lower group.
    Integer arithmetic, so equal shares tie exactly.
    """
    share = [0] * len(weights)
    open_ = [g for g in range(len(weights)) if caps[g] > 0]
    while open_:
        w = {g: weights[g] for g in open_}
        if sum(w.values()) == 0:
            w = {g: caps[g] for g in open_}
        total = sum(w.values())
        full = [g for g in open_ if k * w[g] >= caps[g] * total]
        if not full:
            for g in open_:
                share[g] = k * w[g] // total
            rest = k - sum(share[g] for g in open_)
            for g in sorted(open_, key=lambda g: (-(k * w[g] % total), g))[:rest]:
                share[g] += 1
            break
        for g in full:
            share[g] = caps[g]
            k -= caps[g]
            open_.remove(g)
    return share


def top(members: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` of ``members`` (indices) with the highest ``scores`` (ties → the lower index)."""
    return members[topk_valid(scores[members], torch.ones_like(members, dtype=torch.bool), k)]


@register_strategy(
    "hired",
    needs=("groups", "cls_attention"),
    options={
        "alpha": Option(
            0.5,
            help="share of the budget for the base (full-image) view; 1 − alpha of its tokens decide the crops' shares",
            bounds=(0.0, 1.0),
        ),
    },
)
def keep_hired(signals, budgets, alpha=0.5):
    """HiRED: budget split base view / crops by the base view's CLS attention, top CLS attention in each."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"hired: alpha must be between 0 and 1, got {alpha}")
    kept = []
    for b, k in enumerate(budgets.tolist()):
        valid, groups = signals.valid[b], signals.groups[b]
        scores = signals.cls_attention[b].float()
        members = {g: torch.nonzero(valid & (groups == g)).flatten() for g in sorted(set(groups[valid].tolist()))}
        base = members.pop(0, torch.zeros(0, dtype=torch.long, device=valid.device))
        patchless = [g for g, m in members.items() if bool((scores[m] == 0).all())]
        crops = [m for g, m in members.items() if g not in patchless]
        caps = [len(m) for m in crops]
        k_base = min(math.floor(round(alpha * k, 6)) if crops else k, len(base))
        k_crops = min(k - k_base, sum(caps))
        k_base = min(k - k_crops, len(base))  # what the crops cannot hold goes back to the base view
        shares = weighted_split(chunk_counts(scores[base], len(crops), alpha), caps, k_crops)
        parts = [top(base, scores, k_base)] + [top(m, scores, s) for m, s in zip(crops, shares)]
        if patchless:
            parts.append(torch.cat([members[g] for g in patchless]).sort().values[: k - k_base - k_crops])
        kept.append(torch.cat(parts))
    return kept
