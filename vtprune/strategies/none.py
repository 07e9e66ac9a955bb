import torch

from vtprune.strategies.base import register_strategy


@register_strategy("none")
def keep_all(signals, budgets):
    """No pruning: every visual token is kept (the reference row of every table)."""
    return [torch.nonzero(v).flatten() for v in signals.valid]
