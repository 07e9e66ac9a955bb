"""FastV: keep the visual tokens the last prompt token attends to most at one LLM layer."""

from vtprune.strategies.base import register_strategy, topk_per_sample


@register_strategy(
    "fastv",
    needs=("last_token_attention",),
    stage="in_llm",
    placement={"layer": 2},
)
def keep_fastv(signals, budgets):
    """FastV: top-k visual tokens by the last prompt token's attention at layer K, averaged over heads.

    ``last_token_attention`` [B, H, N] is that attention at the placement's layer K (default 2, the paper's); the
    adapter computes it there and cuts there. Layers after K see only the kept tokens (and so does their KV cache).
    """
    return topk_per_sample(signals.last_token_attention.float().mean(dim=1), signals.valid, budgets)
