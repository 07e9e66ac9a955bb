"""Trimmed Llama (arXiv 2504.00557): keep the visual tokens the text attends to most in the first cross-attention layer.

``cross_attention[b, h, v]`` is the attention of query head ``h`` to visual token ``v``, averaged over the prompt's
valid text rows. ``adaptive`` (the paper's rule) keeps the union of every head's top-k, so the achieved fraction
is at least ``keep_ratio`` and varies per sample; ``budget`` caps that union at exactly ``k`` by walking the
heads' ranked lists round-robin, for equal-budget comparisons with other strategies.
"""

import torch

from vtprune.strategies.base import Option, register_strategy


def head_rankings(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[H, N_valid]`` valid token indices per head, highest score first (ties → lower index)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    return order[:, : int(valid.sum())]


def select_topk_union(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Union over heads of each head's first ``k`` ranked tokens."""
    return torch.unique(ranked[:, :k])


def select_round_robin(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` distinct tokens met reading rank 0 of every head, then rank 1 of every head, ..."""
    kept: dict[int, None] = {}
    for token in ranked.t().flatten().tolist():  # rank-major: head 0 rank 0, head 1 rank 0, ...
        if len(kept) == k:
            break
        kept.setdefault(token)
    return torch.tensor(list(kept), dtype=torch.long, device=ranked.device)


@register_strategy(
    "trimmed_llama",
    needs=("cross_attention",),
    options={
        "mode": Option("adaptive", "adaptive: union of per-head top-k (paper); budget: union capped at k", choices=("adaptive", "budget")),
    },
    stage="in_llm",
)
def keep_trimmed_llama(signals, budgets, mode="adaptive"):
    """Union of per-head top-k text→image attention in the first cross-attention layer (Trimmed Llama)."""
    # Whether the first layer's own cache is cut too is the placement's (prune_first_layer_cache), not the selection's.
    select = select_topk_union if mode == "adaptive" else select_round_robin
    return [
        select(head_rankings(signals.cross_attention[b], signals.valid[b]), int(k)) for b, k in enumerate(budgets.tolist())
    ]
