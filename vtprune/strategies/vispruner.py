"""VisPruner: important tokens by visual (CLS) attention, then diverse tokens by removing duplicates.

VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs"). Rules followed from the authors' code, github.com/Theia-4869/VisPruner,
``llava/model/llava_arch.py`` (``LlavaMetaForCausalLM.encode_images``), defaults from ``llava/eval/model_vqa*.py``:

- for a budget ``T``: ``T_imp = floor(important_ratio · T)`` important tokens, ``T_div = T − T_imp`` diverse ones;
  ``important_ratio`` defaults to 0.5;
- important: the top ``T_imp`` by CLS→patch attention; the rest, in that attention order, are the residual;
- diverse: repeat until ``T_div`` residual tokens are left: split the residual by position into ``a`` (even) and
  ``b`` (odd), score each ``a`` token by its largest cosine similarity to any ``b`` token, drop the
  ``r = min(8, R − T_div)`` highest-scoring ``a`` tokens; the new residual is the other ``a`` tokens in descending
  score order, then every ``b`` token. The kept tokens are the important ones and the final residual.

Deliberate differences:

- similarity: on ``features`` (projector outputs), not the vision tower's hidden states before the projector,
  which vtprune does not expose; in float64, so exact ties are real ties;
- ties: stable sorts throughout: attention ties → the lower index is important; equal duplicate scores → the
  ``a`` token earlier in the residual order is dropped first;
- ``r`` is also at most the number of ``a`` tokens (``ceil(R / 2)``), so odd residuals and small budgets work;
  the authors' shapes assume an even residual and ``r ≤ R / 2``, true at their 576-token settings;
- batching and padding: each sample separately over its valid tokens only; on multi-crop models one ranking and
  one budget over the sample's whole packed sequence, where the authors prune each crop to the same count and
  always keep the row newlines.
"""

import math

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, register_strategy, topk_valid

#: most duplicates dropped per round (the authors' constant)
PER_ROUND = 8


def remove_duplicates(
    unit: torch.Tensor, residual: torch.Tensor, keep: int, per_round: int = PER_ROUND
) -> torch.Tensor:
    """The ``keep`` tokens of ``residual`` (indices into ``unit``, [n, D] unit rows) left by iterative removal."""
    while keep > 0:
        r = min(per_round, len(residual) - keep, (len(residual) + 1) // 2)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        # Rounded to 6 decimals: near-copies (a SigLIP tower's blank-background patches) differ in the 7th digit
        # between engines whose kernels differ (vLLM's fused projections), and must tie so that the order decides.
        scores = torch.round((unit[a] @ unit[b].T).max(dim=1).values, decimals=6)
        order = torch.sort(scores, descending=True, stable=True).indices
        residual = torch.cat([a[order[r:]], b])
    return residual


@register_strategy(
    "vispruner",
    needs=("cls_attention", "features"),
    options={
        "important_ratio": Option(
            0.5, help="share of the budget kept by CLS attention; the rest are diverse tokens", bounds=(0.0, 1.0)
        )
    },
)
def keep_vispruner(signals, budgets, important_ratio=0.5):
    """VisPruner: important tokens by CLS attention, diverse tokens by iterative removal of near-duplicates."""
    if not 0 <= important_ratio <= 1:
        raise ValueError(f"vispruner: important_ratio must be between 0 and 1, got {important_ratio}")
    unit = F.normalize(signals.features.double(), dim=-1)
    kept = []
    for b, k in enumerate(budgets.tolist()):
        valid = signals.valid[b]
        order = topk_valid(signals.cls_attention[b], valid, int(valid.sum()))
        n_important = math.floor(round(important_ratio * k, 6))
        diverse = remove_duplicates(unit[b], order[n_important:], k - n_important)
        kept.append(torch.cat([order[:n_important], diverse[: k - n_important]]))
    return kept
