"""Reference computations shared by the family tests: the full-length equivalents of pruning, built from
transformers' own model, never from the adapter's splice or hooks."""

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from vtprune.models.base import PrunePlan, left_pad_positions
from vtprune.placement import SETTINGS
from vtprune.strategies import STRATEGIES

PLACEMENT_KEYS = {key for keys in SETTINGS.values() for key in keys}
REPO = Path(__file__).resolve().parents[2]


def plan(name, keep=1.0, seed=0, **settings):
    """A plan of strategy ``name``: placement settings (``layer``, ``prune_first_layer_cache``) go to the
    placement, the others are the strategy's options."""
    placement = {k: v for k, v in settings.items() if k in PLACEMENT_KEYS}
    options = {k: v for k, v in settings.items() if k not in PLACEMENT_KEYS}
    return PrunePlan(STRATEGIES.get(name), keep, options, seed, placement)


def masked_layer_hooks(layers, base: torch.Tensor, first: int, last: int | None = None) -> list:
    """Forward pre-hooks on ``layers[first:last]`` whose attention sees only the keys ``base`` [B, S] allows (plus
    every token generated after the prompt): the full-length equivalent of an in-LLM cut. Remove the handles."""

    def make(index):
        def hook(layer, args, kwargs):
            q = (args[0] if args else kwargs["hidden_states"]).shape[1]
            cache = kwargs.get("cache")
            past = cache.get_seq_length(index) if cache is not None else 0
            kv = past + q
            keys = torch.cat([base, base.new_ones(len(base), kv - base.shape[1])], dim=1)
            query_pos = torch.arange(q) + past
            causal = torch.arange(kv)[None, :] <= query_pos[:, None]
            mask = keys[:, None, None, :] & causal[None, None]
            mask |= (torch.arange(kv)[None, :] == query_pos[:, None])[None, None]  # no empty rows (padding, pruned)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    last = len(layers) if last is None else last
    return [layers[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in range(first, last)]


@contextmanager
def hooked(handles):
    """Runs the block with the hooks ``handles`` belong to, and removes them after it, even on an error."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def no_hooks_left(adapter):
    lm = adapter.model.model.language_model
    layers_hooked = any(layer._forward_pre_hooks or layer._forward_hooks for layer in lm.layers)
    return not lm._forward_pre_hooks and not layers_hooked


def image_positions(adapter, inputs, b):
    return torch.nonzero(inputs["input_ids"][b] == adapter.model.config.image_token_id).flatten()


def holed_mask(adapter, inputs, kept):
    """The 2-D padding mask with holes at every pruned image token (``kept``: per sample, into its visual tokens)."""
    mask = inputs["attention_mask"].bool().clone()
    for b, keep in enumerate(kept):
        pos = image_positions(adapter, inputs, b)
        hide = torch.ones(len(pos), dtype=torch.bool)
        hide[torch.tensor(keep, dtype=torch.long)] = False
        mask[b, pos[hide]] = False
    return mask


def padded_positions(adapter, inputs):
    """The positions of a left-padded prompt; the M-RoPE families pass their own instead."""
    return left_pad_positions(inputs["attention_mask"])


def shortened_embeds(adapter, inputs, kept, feats):
    """The LLM input of the pruned prompts, from ``feats`` (each sample's features, from the model's own functions):
    each sample's text embeddings and kept features in order, left padded again; with its mask."""
    embeds = adapter.model.get_input_embeddings()(inputs["input_ids"])
    stays = holed_mask(adapter, inputs, kept)
    rows = []
    for b in range(len(kept)):
        row = embeds[b].clone()
        row[image_positions(adapter, inputs, b)] = feats[b]
        rows.append(row[stays[b]])
    length = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), length, embeds.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, length - len(r) :], mask[b, length - len(r) :] = r, 1
    return batch, mask


def eager_copy(tower):
    """The vision tower with eager attention (which can return its weights) and the same weights."""
    config = copy.deepcopy(tower.config)  # the model's own config object stays sdpa
    eager = type(tower)._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(tower.state_dict())
    assert eager.config._attn_implementation == "eager" and tower.config._attn_implementation == "sdpa"
    return eager


def narrowed(arch, config_class, model_class, **text):
    """The model of configs/architectures/<arch> on the meta device, narrowed to tiny widths: its geometry (tiles,
    patches, token counts) without its size. Returns the model and the config's dict."""
    data = json.loads((REPO / f"configs/architectures/{arch}/config.json").read_text())
    data["vision_config"].update(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    data["text_config"].update(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, **text)
    data.pop("architectures"), data.pop("model_type")
    with torch.device("meta"):
        return model_class(config_class(**data)), data
