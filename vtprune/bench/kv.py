"""KV-cache accounting: bytes measured from a transformers cache object, and the same figure from the HF config.

Both split self-attention from cross-attention (Mllama's ``text_config.cross_attention_layers``), so that a
measured run can be checked against the analytic figure and ``vtprune cost`` can give it for a full-size
model without allocating one.
"""

from __future__ import annotations


def cross_layer_indices(config) -> set[int]:
    """Decoder layers that cross-attend to the image (empty for self-attention VLMs)."""
    text = config.get_text_config(decoder=True)
    return set(getattr(text, "cross_attention_layers", None) or ())


def measured_kv_bytes(cache, config) -> dict:
    """``{"self", "cross"}`` bytes of the keys and values a transformers cache holds."""
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache keeps the two kinds apart itself
        return {"self": measured_kv_bytes(cache.self_attention_cache, config)["self"],
                "cross": measured_kv_bytes(cache.cross_attention_cache, config)["self"]}
    cross = cross_layer_indices(config)
    out = {"self": 0, "cross": 0}
    for index, layer in enumerate(cache.layers):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                out["cross" if index in cross else "self"] += t.numel() * t.element_size()
    return out


def layer_tokens(config, *, text_tokens: int, num_visual: int, num_kept, placement) -> list[tuple[str, int, int, int]]:
    """Per decoder layer: (kind, query tokens, key tokens during prefill, tokens cached after prefill), one sample.

    Self-attention models: the image tokens are part of the sequence (``text_tokens`` excludes them).
    Cross-attention models: the self-attention layers see only the text; the cross layers see the image.
    ``num_kept``: the visual tokens kept, or for a multi-stage placement a list, the count after each stage.
    """
    stage_layers = placement.stage_layers
    stages = list(num_kept) if isinstance(num_kept, (list, tuple)) else [num_kept] * max(1, len(stage_layers))
    num_kept = stages[-1]
    text = config.get_text_config(decoder=True)
    cross = cross_layer_indices(config)
    out = []
    first_cross = min(cross) if cross else None
    for index in range(text.num_hidden_layers):
        if index in cross:
            # The first cross layer attends to (and caches) every visual token in prefill; later ones the kept.
            full = placement.where == "cross_attention" and not placement.prune_first_layer and index == first_cross
            keys = num_visual if full else num_kept
            cached = num_visual if full and not placement.prune_first_layer_cache else num_kept
            out.append(("cross", text_tokens, keys, cached))
        elif cross:
            out.append(("self", text_tokens, text_tokens, text_tokens))
        else:
            seen = num_visual if stage_layers else num_kept
            for k, count in zip(stage_layers, stages):
                seen = count if index >= k else seen
            seq = text_tokens + seen
            out.append(("self", seq, seq, seq))
    return out


def kv_bytes_per_token(config, element_size: int) -> int:
    """Bytes one token adds to one layer's cache: K and V over the KV heads."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head_dim * element_size


def analytic_kv_bytes(config, *, batch_size: int, text_tokens: int, num_visual: int, num_kept, placement,
                      element_size: int, decoded: int = 0) -> dict:
    """``{"self", "cross"}`` cache bytes after prefill plus ``decoded`` tokens fed back (self-attention layers grow).

    ``num_kept`` is the batch's longest kept set: shorter samples are padded to it.
    """
    per_token = kv_bytes_per_token(config, element_size)
    out = {"self": 0, "cross": 0}
    for kind, _, _, cached in layer_tokens(config, text_tokens=text_tokens, num_visual=num_visual, num_kept=num_kept, placement=placement):
        out[kind] += batch_size * per_token * (cached + (decoded if kind == "self" else 0))
    return out


def num_visual_tokens(config) -> int:
    """Visual tokens of one image at the model's largest input, counted by the model's family from its config."""
    from vtprune.models import resolve_family

    return resolve_family(config.model_type, "auto").max_visual_tokens(config)


def vision_flops(config, resized_to: float | None = None, merged=None) -> int:
    """Multiply-adds × 2 of the vision tower and projector for one image at the model's largest input (its family's);
    with ``resized_to``, of that image as an input-space strategy (``downsample``) resizes it at that keep ratio;
    with ``merged`` (keep ratio, schedule), as a strategy inside the tower (ToMe) merges it layer by layer."""
    from vtprune.models import resolve_family

    family = resolve_family(config.model_type, "auto")
    if merged is not None:
        return family.merged_vision_flops(config, *merged)
    return family.vision_flops(config) if resized_to is None else family.resized_vision_flops(config, resized_to)

