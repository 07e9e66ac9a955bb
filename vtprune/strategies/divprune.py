"""DivPrune: greedy max–min diversity of the visual tokens."""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import register_strategy


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min subset of ``k`` rows of ``features`` [n, D] under cosine distance ``1 − cos``.

    The first pick is the token farthest from its own nearest neighbour (DivPrune's released code: the
    second-smallest entry of each distance column, the smallest being the token itself); then each step
    adds the token whose distance to the selected set (its nearest selected token) is largest. Ties → lower index.
    """
    distance = cosine_distance(features)
    n = len(features)
    k = min(k, n)
    nearest = (
        distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf")).min(dim=1).values
    )
    chosen = [int(torch.argmax(nearest))]  # argmax returns the first maximum
    to_chosen = distance[chosen[0]].clone()
    to_chosen[chosen[0]] = float("-inf")
    while len(chosen) < k:
        chosen.append(int(torch.argmax(to_chosen)))
        to_chosen = torch.minimum(to_chosen, distance[chosen[-1]])
        to_chosen[chosen[-1]] = float("-inf")
    return torch.tensor(chosen, device=features.device)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` between rows, float64, exactly symmetric and rounded to 12 decimals: ``U·Uᵀ`` is not symmetric in
    the last bit, nor equal for equal rows at different places (a GEMM's blocking), and two mutual nearest
    neighbours, or two copies of one vector (LLaVA-NeXT's newline tokens), must tie exactly so that the lower index
    wins, not the rounding of the engine that computed them."""
    unit = F.normalize(features.double(), dim=-1)
    distance = 1 - unit @ unit.T
    return torch.round((distance + distance.T) / 2, decimals=12)


@register_strategy("divprune", needs=("features",))
def keep_divprune(signals, budgets):
    """DivPrune: greedy max–min cosine diversity of the projector outputs (most isolated token first)."""
    kept = []
    for b, k in enumerate(budgets.tolist()):
        candidates = torch.nonzero(signals.valid[b]).flatten()
        kept.append(candidates[max_min_diverse(signals.features[b, candidates], k)])
    return kept
