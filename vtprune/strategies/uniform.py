import torch

from vtprune.strategies.base import register_strategy


def evenly_spaced(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` of ``candidates`` at evenly spaced positions, first and last included when k > 1."""
    n = len(candidates)
    if k >= n:
        return candidates
    if k == 1:
        return candidates[n // 2 : n // 2 + 1]
    pos = torch.round(torch.arange(k, dtype=torch.float64) * (n - 1) / (k - 1)).long()
    return candidates[pos]


def split_budget(sizes: list[int], k: int) -> list[int]:
    """Split ``k`` over groups in proportion to their sizes (largest remainders), never above a group's size."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    share = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - int(exact[g])), g))
    while sum(share) < k:
        for g in order:
            if sum(share) < k and share[g] < sizes[g]:
                share[g] += 1
    return share


@register_strategy("uniform", needs=("groups",))
def keep_uniform(signals, budgets):
    """Evenly spaced visual tokens within each tile / crop, the budget split by tile size."""
    kept = []
    for b, k in enumerate(budgets.tolist()):
        valid = signals.valid[b]
        groups = signals.groups[b] if signals.groups is not None else torch.zeros_like(valid, dtype=torch.long)
        ids = sorted(set(groups[valid].tolist()))
        members = [torch.nonzero(valid & (groups == g)).flatten() for g in ids]
        shares = split_budget([len(m) for m in members], k)
        kept.append(torch.cat([evenly_spaced(m, s) for m, s in zip(members, shares)]))
    return kept
