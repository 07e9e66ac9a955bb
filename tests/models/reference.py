"""Reference computations shared by the family tests: the full-length equivalents of pruning."""

import torch

from vtprune.models.base import PrunePlan
from vtprune.placement import SETTINGS
from vtprune.strategies import STRATEGIES

PLACEMENT_KEYS = {key for keys in SETTINGS.values() for key in keys}


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
