"""``vtprune cost``: analytic KV-cache bytes and prefill FLOPs of a model at each keep ratio, from its HF config alone.

Nothing is allocated, so the full-size architectures (LLaMA-3.2-11B-Vision, LLaVA-1.5/NeXT-7B) are costed on a
laptop. The figures are those of the synthetic benchmark input: ``bench.prompt_tokens`` text tokens and one image
at the model's largest input, cache taken at the end of prefill. Kept counts use the strategy's budget
``ceil(r · N)``; trimmed_llama's adaptive mode keeps at least that many (its union over heads).

Beside them, the ideal speed-ups a measured one is compared with: time to first token bound by FLOPs (vision tower
and projector, the same at every keep ratio, plus the language model's prefill), a decode step bound by the bytes
it reads (the language model's weights plus the KV cache).
"""

from __future__ import annotations

from vtprune.bench.kv import (
    analytic_kv_bytes,
    cross_layer_indices,
    layer_tokens,
    num_visual_tokens,
    vision_flops,
)

from vtprune.placement import Placement, placement_for_config

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def prefill_flops(config, *, batch_size: int, text_tokens: int, num_visual: int, num_kept, placement) -> int:
    """Multiply-adds × 2 of the language model's prefill (projections, attention, MLP, one LM-head row).

    Attention counts every query-key pair (no causal saving), as sdpa computes it. The vision encoder and the
    projector, the same at every keep ratio, are not counted here (``vision_flops``).
    """
    text = config.get_text_config(decoder=True)
    h, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    total = 0
    for kind, queries, keys, _ in layer_tokens(config, text_tokens=text_tokens, num_visual=num_visual, num_kept=num_kept, placement=placement):
        kv_inputs = queries if kind == "self" else keys  # cross layers project K/V from the visual tokens
        total += 2 * queries * h * heads * head_dim * 2  # q_proj, o_proj
        total += 2 * kv_inputs * h * kv_heads * head_dim * 2  # k_proj, v_proj
        total += 2 * 2 * queries * keys * heads * head_dim  # QKᵀ and AV
        total += 2 * queries * 3 * h * text.intermediate_size  # gate, up, down
    total += 2 * h * text.vocab_size  # generate() computes the logits of the last position only
    return batch_size * total


def decoder_weight_bytes(config, element_size: int) -> int:
    """Bytes of the language model's weight matrices that every decode step reads: each decoder layer's q/k/v/o
    projections and gated MLP, and the LM head. A cross-attention layer's k/v projections are left out: they run
    on the image once, in prefill, and decode reads their cached output.

    The input embedding table is left out: a step reads one row of it per sample. Norms and biases are too (< 0.01 %).
    """
    text = config.get_text_config(decoder=True)
    h, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    q_o, k_v = 2 * h * heads * head_dim, 2 * h * kv_heads * head_dim
    layers = text.num_hidden_layers * (q_o + k_v + 3 * h * text.intermediate_size) - len(cross_layer_indices(config)) * k_v
    return element_size * (layers + h * text.vocab_size)


def request_flops(config, *, text_tokens: int, num_visual: int, num_kept: int, output_tokens: int) -> dict:
    """Multiply-adds × 2 of one served request with one image: ``prefill`` (the vision tower and projector, the same
    at every keep ratio, plus the language model's prefill of the kept prompt) and ``total`` (plus ``output_tokens``
    decode steps, each one token through the language model's weight matrices and LM head; attention over the cache
    left out, under 3 % of a step at these lengths). What a serving engine's throughput is bound by when it is
    compute-bound, beside the token counts alone, which leave the vision tower out."""
    prefill = vision_flops(config) + prefill_flops(config, batch_size=1, text_tokens=text_tokens, num_visual=num_visual,
                                                   num_kept=num_kept, placement=Placement())
    return {"prefill": prefill, "total": prefill + output_tokens * 2 * decoder_weight_bytes(config, 1)}


def ideal_figures(config, *, batch_size: int, text_tokens: int, num_visual: int, num_kept, placement,
                  element_size: int, resized_to: float | None = None, merged=None) -> dict:
    """The bound figures of one point and its ideal speed-ups over ``none`` on the same input and batch size.

    ``total_prefill_flops`` (vision + LLM prefill) bounds the time to first token; ``decode_bytes_per_step``
    (weights + the cache after prefill) bounds a decode step, which is memory-bound at these batch sizes.
    ``resized_to``: the keep ratio of a strategy that shrinks the input image (the vision tower then runs on less);
    ``merged``: ``(keep ratio, schedule)`` of a strategy that merges inside the vision tower (ToMe).
    """
    def figures(kept, where, vision):
        kv = analytic_kv_bytes(config, batch_size=batch_size, text_tokens=text_tokens, num_visual=num_visual,
                               num_kept=kept, placement=where, element_size=element_size)
        llm = prefill_flops(config, batch_size=batch_size, text_tokens=text_tokens, num_visual=num_visual,
                            num_kept=kept, placement=where)
        return {"kv_self_bytes": kv["self"], "kv_cross_bytes": kv["cross"], "kv_bytes": kv["self"] + kv["cross"],
                "prefill_flops": llm, "vision_flops": vision, "total_prefill_flops": vision + llm,
                "decode_bytes_per_step": weights + kv["self"] + kv["cross"]}

    full = batch_size * vision_flops(config)
    resized = full if resized_to is None and merged is None else batch_size * vision_flops(config, resized_to, merged)
    weights = decoder_weight_bytes(config, element_size)
    point, none = figures(num_kept, placement, resized), figures(num_visual, Placement(), full)
    return {**point, "ideal_ttft_speedup": none["total_prefill_flops"] / point["total_prefill_flops"],
            "ideal_decode_speedup": none["decode_bytes_per_step"] / point["decode_bytes_per_step"]}


def cost_rows(hf_config, *, strategies: list, ratios: list[float], batch_sizes: list[int], prompt_tokens: int,
              dtype: str, model: str = "") -> list[dict]:
    """One row per (strategy, keep_ratio, batch_size); ``strategies`` are (Strategy, placement settings) pairs."""
    n = num_visual_tokens(hf_config)
    rows = []
    for strategy, settings in strategies:
        placement = placement_for_config(strategy, settings, hf_config)
        for ratio in [1.0] if strategy.name == "none" else ratios:
            kept = n if strategy.name == "none" else stage_budgets(n, ratio, placement, strategy.schedule)
            for batch in batch_sizes:
                rows.append({
                    "model": model, "family": hf_config.model_type, "strategy": strategy.name, "keep_ratio": ratio,
                    "batch_size": batch, "dtype": dtype, "prompt_tokens": prompt_tokens, "num_visual": n,
                    "num_kept": kept[-1] if isinstance(kept, list) else kept,
                    **({"stage_kept": kept} if isinstance(kept, list) else {}),
                    **ideal_figures(hf_config, batch_size=batch, text_tokens=prompt_tokens, num_visual=n, num_kept=kept,
                                    placement=placement, element_size=DTYPE_BYTES[dtype],
                                    resized_to=resized_ratio(strategy, ratio),
                                    merged=tower_merge(strategy, ratio)),
                })
    return rows


def cost_for_config(config, *, batch_sizes=None, ratios=None, strategies=None) -> list[dict]:
    """``cost_rows`` for a vtprune ``Config``: its model's HF config, its strategy (or ``strategies``), its dtype."""
    from transformers import AutoConfig

    from vtprune.errors import ConfigError
    from vtprune.models import resolve_path
    from vtprune.strategies import STRATEGIES

    try:
        hf_config = AutoConfig.from_pretrained(resolve_path(config.model.path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot load a model config from '{config.model.path}': {str(exc).splitlines()[0]}") from None
    from vtprune.models import resolve_family

    resolve_family(hf_config.model_type, "auto")  # an unsupported model type is one line naming the supported ones
    names = strategies or [config.pruning.strategy]
    pairs = [(STRATEGIES.get(s), config.pruning.point(s, 1.0)["placement"]) for s in names]
    dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype  # auto: full-size models run on a GPU
    return cost_rows(hf_config, strategies=pairs, ratios=check_ratios(ratios or [1.0, 0.75, 0.5, 0.25]),
                     batch_sizes=batch_sizes or config.bench.batch_sizes, prompt_tokens=config.bench.prompt_tokens,
                     dtype=dtype, model=config.model.path)


def tower_merge(strategy, ratio: float):
    """``(ratio, schedule)`` for a strategy that merges inside the vision tower (``ideal_figures``' ``merged``)."""
    return (ratio, strategy.schedule) if strategy.stage == "vision" and ratio < 1 else None


def resized_ratio(strategy, ratio: float) -> float | None:
    """The keep ratio the input image is resized to, for a strategy that merges in the input space; else None."""
    return ratio if strategy.merge_space == "input" and ratio < 1 else None


def stage_budgets(n: int, ratio: float, placement, schedule=None):
    """Tokens kept: ``ceil(r · N)``; over several in-LLM stages, each stage keeps ``ceil(r · ·)`` of the last one's,
    or what the strategy's own ``schedule`` says."""
    from vtprune.strategies.base import budget

    if schedule is not None and placement.layers and placement.where == "in_llm":
        counts = schedule(n, ratio, len(placement.layers))
        return counts if len(counts) > 1 else counts[0]
    counts = [n]
    for _ in placement.layers or [None]:
        counts.append(budget(counts[-1], ratio))
    return counts[1:] if len(placement.layers) > 1 else counts[1]


def check_ratios(ratios: list[float]) -> list[float]:
    from vtprune.errors import ConfigError

    for r in ratios:
        if not 0 < r <= 1:
            raise ConfigError(f"--ratios: {r} is outside the allowed range (0, 1]")
    return ratios
