"""VisionZip: dominant tokens by CLS attention, plus contextual tokens merged from the rest.

VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language Models").
Rules followed from the authors' code, github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and the defaults in ``README.md`` / ``visionzip/main.py``:

- dominant tokens: the top ``D`` by CLS→patch attention;
- contextual tokens: the other tokens, in index order, give ``C`` targets at positions ``0, s, 2s, ...`` with
  ``s = max(1, R // C)`` (``R`` tokens left, the first ``C`` of those positions); every other left-over token is
  assigned to the target whose unit vector has the largest dot product with its own (ties → the lower target);
- the default split is 54 dominant + 10 contextual for 64 tokens (also 108 + 20 at 128, 162 + 30 at 192).

Deliberate differences:

- split: for a budget ``B``, ``D = round(dominant_fraction · B)`` (half up), at least 1 and at most ``B``, and
  ``C = B − D`` (54 + 10 at 64; 1 + 0 at 1 or 2); the authors take fixed counts. Their 54 includes the vision
  tower's CLS token, which their LLM sees; vtprune's visual tokens carry no CLS, so all ``D`` are patches;
- similarity: on ``features`` (projector outputs, the vectors being merged), not the vision tower's keys of the
  second-to-last layer, which vtprune does not expose; float64, so exact ties are real ties;
- merge weights: a contextual token is the uniform mean of its target and the tokens assigned to it (``Selection``
  weights sum to 1). The authors' code adds the target to the *mean* of its assigned tokens (weights 1 and
  ``1/c``, summing to 2);
- a target that nothing is assigned to is kept as it is, not written as a one-token merge;
- placement: a contextual token takes its target's slot (and position); the authors append the contextual tokens
  after the dominant ones;
- batching and padding: each sample separately over its valid tokens only (padding is never ranked, a target or
  a source); on multi-crop models one ranking and one budget over the sample's whole packed sequence, where the
  authors run each crop with the same fixed counts. Ties in the attention ranking → the lower index (stable sort).
"""

import math

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, Selection, register_strategy, topk_valid


def split(k: int, dominant_fraction: float) -> tuple[int, int]:
    """``(dominant, contextual)`` counts for a budget ``k``: dominant rounded half up, at least 1."""
    dominant = min(k, max(1, math.floor(round(dominant_fraction * k, 6) + 0.5)))
    return dominant, k - dominant


def contextual(unit: torch.Tensor, rest: torch.Tensor, count: int) -> list[list[int]]:
    """Groups ``[target, assigned...]`` of token indices: ``count`` evenly spaced targets among ``rest`` (sorted)."""
    count = min(count, len(rest))
    if count == 0:
        return []
    step = max(1, len(rest) // count)
    is_target = torch.zeros(len(rest), dtype=torch.bool, device=rest.device)
    is_target[torch.arange(0, len(rest), step, device=rest.device)[:count]] = True
    targets, others = rest[is_target], rest[~is_target]
    groups = [[int(t)] for t in targets]
    if len(others):
        nearest = (unit[others] @ unit[targets].T).argmax(dim=1)  # argmax returns the first maximum
        for token, target in zip(others.tolist(), nearest.tolist()):
            groups[target].append(token)
    return groups


@register_strategy(
    "visionzip",
    needs=("cls_attention", "features"),
    merges=True,
    options={
        "dominant_fraction": Option(
            54 / 64,
            help="share of the budget kept as dominant tokens (the rest are merged contextual tokens)",
            bounds=(0.0, 1.0),
        )
    },
)
def keep_visionzip(signals, budgets, dominant_fraction=54 / 64):
    """VisionZip: dominant tokens by CLS attention, contextual tokens merged around evenly spaced targets."""
    if not 0 <= dominant_fraction <= 1:
        raise ValueError(f"visionzip: dominant_fraction must be between 0 and 1, got {dominant_fraction}")
    unit = F.normalize(signals.features.double(), dim=-1)
    out = []
    for b, k in enumerate(budgets.tolist()):
        valid = signals.valid[b]
        n = int(valid.sum())
        n_dominant, n_contextual = split(min(k, n), dominant_fraction)
        order = topk_valid(signals.cls_attention[b], valid, n)
        rest = order[n_dominant:].sort().values
        groups = contextual(unit[b], rest, n_contextual)
        merged = [g for g in groups if len(g) > 1]
        kept = order[:n_dominant].tolist() + [g[0] for g in groups if len(g) == 1]
        weights = torch.zeros(len(merged), valid.shape[0], device=signals.features.device)
        for row, g in enumerate(merged):
            weights[row, g] = 1.0 / len(g)
        out.append(
            Selection(
                torch.tensor(kept, dtype=torch.long, device=valid.device),
                torch.tensor([g[0] for g in merged], dtype=torch.long, device=valid.device),
                weights,
            )
        )
    return out
