"""FitPrune: visual tokens deleted inside the LLM after every layer, by a fitted per-layer schedule.

FitPrune (Ye, Wu, Lin, Zhou, AAAI 2025, "Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal
Large Language Models", arXiv 2409.10197). Rules followed from the authors' code, github.com/ywh187/FitPrune,
``LLaVA_1.5/llava/model/language_model/modeling_llama.py`` (``LlamaAttention.forward``, the ``# fitprune`` block:
the ``delete_scheme`` tables and the per-layer score; ``LlamaModel.forward``: the tokens left after each layer) and
``LLaVA_1.5/llava/eval/statistical_analysis.py`` (``statistical_analysis`` / ``fit_model``: how the tables are
fitted, a binary search on a share of each layer's attention mass over a calibration set until a FLOPs target is
met); read for the rule, not copied.

The rule as implemented. At the authors' decoder layer ``idx`` with ``d = delete_scheme[idx] > 0``, during prefill,
with ``A`` the layer's attention probabilities, the maximum over heads, and ``n`` the visual tokens left:

- ``self_j = Σ_i A[v_i, v_j] / n`` over the visual rows (causal: only rows ``i >= j`` contribute);
- ``cross_j = Σ_t A[t, v_j]`` over the text rows after the image;
- the ``d`` visual tokens with the smallest ``cross · self`` are deleted; the later layers never see them.

``DELETE_SCHEMES`` are the authors' fitted tables for LLaVA-1.5-7B (32 layers, 576 visual tokens), one per FLOPs
reduction ratio 0, 10, 20, 30, 40, 50, 55, 60, 70, 80 and 90 %, reproduced exactly from that file (they are data).

vtprune's placement is a stage after every decoder layer, ``K = 1 .. L−1`` (``{"layers": "all"}``). Stage ``K`` is
scored with layer ``K−1``'s attention on its input (``text_attention_max``, ``visual_attention_max``) and layers
``K..`` see only what it keeps: the authors' deletion at layer ``idx`` is vtprune's stage ``K = idx + 1``. Their
layer 31 always deletes 0 and has no stage.

Counts (``schedule``): ``keep_ratio`` r is vtprune's equivalent-token fraction, the layer-weighted average of the
visual tokens each layer sees, over N. Each table's own fraction on 32 layers and 576 tokens (layer ``j`` sees
``576 − Σ_{idx<j} d_idx``) is computed exactly; the table closest to r is used (a tie: the one keeping more). Stage
``s`` (``K = s + 1`` of ``L = stages + 1`` layers) reads the table at the same depth, the authors' layer
``depth = round((s + 1) · 32 / L) − 1`` (half up), and keeps ``round(N · f(depth))`` (half up),
``f(idx) = (576 − Σ_{i<=idx} d_i) / 576`` (1 for a depth below 0), never more than the previous stage and at least
one. On LLaVA-1.5-7B itself (L = 32, N = 576) that is the authors' count after each layer, exactly.
``keep_ratio >= 1`` keeps every token at every stage. Each vtprune layer thus sees what the authors' first layer at
its depth sees, never fewer.

Deliberate differences:

- the table is chosen by its equivalent fraction from vtprune's ``keep_ratio``; the authors name the FLOPs
  reduction ratio of the table (``reduction_ratio``) directly, and fit no tables for other models;
- other depths and token counts: the tables fitted for 32 layers and 576 tokens are read at the same relative depth
  and scaled to N as above (one shape for every model, not refitted); with a placement other than the default (a
  stage after every layer), stage ``s`` is still read as if the stages were ``L = stages + 1`` layers apart evenly;
- the authors' layer ``idx`` runs its own attention output, residual and MLP on the kept tokens only; in vtprune
  layer ``K−1`` runs whole and the next layer starts without them. The authors' KV cache keeps the deleted tokens at
  the deleting layer; vtprune's adapter decides the cache;
- the head maximum is computed in float32 on vtprune's recomputed attention of the layer (the authors read their
  fp16 eager softmax); the score is then formed in float64;
- ties: among equal scores the lower index is kept (the authors' ascending ``torch.sort`` deletes in an unspecified
  order); a sample without text rows scores every token 0 and keeps the lowest indices;
- batching and padding: each sample separately over its valid visual tokens and text rows (the authors run batch 1
  with the image at a fixed offset of 35); counts come from each sample's own original count ``num_visual``; on
  multi-crop models one ranking and one count over the sample's packed sequence. ``budgets`` (ceil of keep_ratio
  of what is present) are not used: FitPrune keeps its schedule's counts.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import torch

from vtprune.strategies.base import register_strategy

#: the authors' depth and visual-token count (LLaVA-1.5-7B), which the tables were fitted on
LAYERS = 32
TOKENS = 576

#: ``delete_scheme`` per reduction ratio (%): visual tokens deleted at each of the authors' layers 0..31
DELETE_SCHEMES = {
    0: (0,) * 32,
    10: (0, 0, 1, 2, 1, 0, 1, 4, 5, 5, 11, 4, 2, 2, 0, 0, 1, 1, 2, 4, 2, 10, 1, 1, 1, 2, 1, 1, 0, 1, 0, 0),
    20: (0, 0, 3, 3, 1, 1, 4, 16, 14, 15, 24, 4, 2, 3, 2, 0, 6, 0, 5, 13, 4, 19, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0),
    30: (0, 0, 7, 6, 4, 5, 16, 40, 24, 21, 24, 4, 2, 3, 4, 0, 16, 0, 11, 26, 6, 32, 3, 1, 0, 1, 2, 2, 4, 0, 0, 0),
    40: (0, 1, 21, 13, 14, 11, 41, 53, 29, 15, 14, 5, 1, 4, 5, 1, 26, 1, 13, 28, 6, 27, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0),
    50: (3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0, 1, 1, 2, 0, 0, 0),
    55: (6, 17, 69, 31, 34, 19, 59, 30, 23, 6, 8, 7, 2, 5, 8, 2, 29, 4, 12, 25, 4, 19, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0),
    60: (14, 33, 89, 36, 36, 20, 55, 21, 18, 4, 7, 5, 2, 5, 7, 4, 26, 5, 11, 24, 4, 18, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0),
    70: (48, 79, 118, 41, 33, 17, 36, 9, 9, 2, 3, 2, 1, 3, 4, 8, 18, 7, 8, 20, 4, 13, 2, 1, 0, 0, 1, 0, 1, 0, 0, 0),
    80: (128, 127, 118, 35, 26, 8, 13, 3, 2, 1, 0, 0, 0, 2, 1, 8, 7, 8, 5, 11, 2, 6, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0),
    90: (262, 153, 80, 19, 13, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0),
}


def left_after(ratio: int) -> list[int]:
    """The visual tokens left after each of the authors' layers 0..31 with the table of ``ratio``."""
    left, out = TOKENS, []
    for d in DELETE_SCHEMES[ratio]:
        left -= d
        out.append(left)
    return out


def equivalent_fraction(ratio: int) -> Fraction:
    """The table's layer-weighted mean of the visual tokens each layer sees, over 576 (exact)."""
    seen = [TOKENS] + left_after(ratio)[:-1]  # layer j sees what layer j−1 left
    return Fraction(sum(seen), LAYERS * TOKENS)


def choose_table(keep_ratio: float) -> int:
    """The reduction ratio whose table's equivalent fraction is closest to ``keep_ratio`` (a tie: the larger
    fraction). Compared exactly: a float keep ratio is a dyadic rational."""
    r = Fraction(keep_ratio)
    return min(DELETE_SCHEMES, key=lambda t: (abs(equivalent_fraction(t) - r), -equivalent_fraction(t)))


def depth(stage: int, layers: int) -> int:
    """The authors' layer whose output stage ``stage`` (K = stage + 1 of ``layers``) is read at: ``round((stage + 1)
    · 32 / layers) − 1``, half up, in integers so that no float rounding moves a boundary."""
    return (2 * (stage + 1) * LAYERS + layers) // (2 * layers) - 1


@lru_cache(maxsize=256)
def _schedule(num_visual: int, keep_ratio: float, stages: int) -> tuple[int, ...]:
    if keep_ratio >= 1:
        return (num_visual,) * stages
    left = left_after(choose_table(keep_ratio))
    counts = []
    for s in range(stages):
        at = depth(s, stages + 1)
        remaining = TOKENS if at < 0 else left[at]
        count = (2 * num_visual * remaining + TOKENS) // (2 * TOKENS)  # round half up, exact
        # depth never decreases and the table never adds tokens back: the counts never rise from stage to stage
        counts.append(min(num_visual, max(1, count)))
    return tuple(counts)


def schedule(num_visual: int, keep_ratio: float, stages: int) -> list[int]:
    """The visual tokens left after each of ``stages`` stages (what the adapter keeps, cost and kv figures assume)."""
    return list(_schedule(int(num_visual), float(keep_ratio), int(stages)))


def scores(signals, b: int, present: torch.Tensor) -> torch.Tensor:
    """[n] float64: ``cross · self`` of sample ``b``'s present visual tokens (in ``present`` order)."""
    visual = signals.visual_attention_max[b][present][:, present].double()
    self_score = visual.sum(dim=0) / len(present)
    text = signals.text_attention_max[b]
    if signals.text_valid is not None:
        text = text[signals.text_valid[b]]
    cross = text[:, present].double().sum(dim=0)
    return cross * self_score


@register_strategy(
    "fitprune",
    needs=("text_attention_max", "visual_attention_max"),
    stage="in_llm",
    placement={"layers": "all"},
    schedule=schedule,
)
def keep_fitprune(signals, budgets):
    """FitPrune: after every LLM layer drop the visual tokens of least text × visual head-max attention (fitted counts).

    Follows its own count schedule from ``signals.keep_ratio``, ``num_visual``, ``stage`` and ``stages``, not
    ``budgets``.
    """
    if signals.keep_ratio is None:
        raise ValueError("fitprune: signals.keep_ratio is not set (Strategy.selections sets it)")
    if signals.stages is None:
        raise ValueError("fitprune: signals.stages is not set (the in-LLM adapter sets it)")
    num_visual = signals.num_visual if signals.num_visual is not None else signals.num_valid
    out = []
    for b in range(signals.valid.shape[0]):
        present = signals.valid[b].nonzero().squeeze(1)
        count = schedule(int(num_visual[b]), signals.keep_ratio, signals.stages)[signals.stage]
        if count >= len(present):
            out.append(present)
            continue
        order = torch.sort(scores(signals, b, present), descending=True, stable=True).indices
        out.append(present[order[:count]].sort().values)
    return out
