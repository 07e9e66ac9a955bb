import torch

from vtprune.strategies.base import register_strategy


@register_strategy("random")
def keep_random(signals, budgets):
    """Seeded uniform random subset of the visual tokens (seed from the config)."""
    kept = []
    for valid, k, gen in zip(signals.valid, budgets.tolist(), signals.generators):
        candidates = torch.nonzero(valid).flatten()
        perm = torch.randperm(len(candidates), generator=gen)
        kept.append(candidates[perm[:k]])
    return kept
