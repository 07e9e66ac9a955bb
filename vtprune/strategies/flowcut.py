"""FlowCut: patches pruned inside the vision tower by an information-flow score accumulated over its layers.

FlowCut (Tong, Jin, Qin, Li, Zou, Li, Li, Li, NeurIPS 2025, "FlowCut: Rethinking Redundancy via Information Flow
for Efficient Vision-Language Models", arXiv 2505.19536). Rules followed from the authors' code,
github.com/TungChintao/FlowCut, ``flowcut/modeling_clip_flowcut.py`` (``CLIPAttention_forward``,
``CLIPEncoderLayer_forward``, ``CLIPEncoder_forward``, ``apply_flowcut_config``), ``flowcut/utils_flowcut.py``
(``compute_score``, ``adaptive_prune_ratio``) and ``flowcut/main.py`` (``flowcut``), read for the rule, not copied:

- in every CLIP encoder layer, after its MLP, while a crop has more than ``target`` patches: each patch's score is
  ``(a / Σa + s / Σs) · ‖v‖₁`` over the patches (the CLS excluded), with ``a`` the CLS row of the layer's attention
  (head mean), ``s`` the head mean of the softmax over the tokens of the CLS value · each value (unscaled) and
  ``v`` the head-mean value; the cumulative score is the score at the first layer, then
  ``0.5 · previous + 0.5 · score``;
- ``rpl = select_layer − idx − 1`` layers are left to prune in; at a layer with an even ``rpl`` the crop keeps
  ``max(n − prune, target)`` patches of the highest cumulative scores (back in index order; the CLS always stays),
  ``prune = round((n − target) / √rpl · (1 − e²))`` with ``e`` the entropy of the normalised CLS attention over
  the ``n`` patches divided by ``log n`` (a flat attention prunes little), and at ``rpl = 0`` all but the target;
- ``select_layer`` is the tower's layer count − 2 (22 on CLIP-L), so they prune at idx 0..21 (``rpl`` 21..0) and
  the layer LLaVA-1.5 reads (idx 22, ``rpl`` −1) and the last one see exactly the target.

vtprune's placement ``vision`` (``LlavaAdapter``) calls this once per vision layer ``i = 0 .. L − 1``, ``L`` the
layers up to the one whose output the projector reads (``Signals.stages``; 23 on LLaVA-1.5), after the layer's
MLP, one sample per crop, the CLS token at index 0 not valid (the adapter keeps it); ``budgets`` are the final
target. ``rpl = L − 2 − i`` is theirs: on LLaVA-1.5 their ``select_layer`` 22 is ``L − 1``. The cumulative scores
travel from layer to layer as ``Selection.carry`` (full width, by current token index; the adapter gathers the
survivors' and hands them back as ``Signals.carry``).

Deliberate differences:

- the count: per crop (each crop's own entropy); theirs takes the largest count over the batch's images;
- ties: the lower index (stable sort); theirs ``torch.topk``, whose order among equal scores is unspecified;
- float64 scoring, and ``0 · log 0 = 0`` in the entropy (theirs NaN, on which ``int()`` fails); rounding half to
  even, as their ``Tensor.round`` (and Python's ``round``): 2.5 → 2, 3.5 → 4;
- the target: vtprune's budget, ``ceil(keep_ratio · patches)`` patches per crop; theirs a fixed ``target_num``
  (64 / 128 / 192, plus one for the CLS). The normalisations run over the valid patches only, so the CLS column
  of the signals' softmaxes (theirs drop it too) and padding do not matter;
- ``select_layer`` follows the layer vtprune's adapter says the projector reads (``L − 1``), not the tower's depth
  − 2 (the same on LLaVA-1.5); a one-layer tower (``L = 1``) prunes to the target at its only layer (``rpl`` 0);
- LLaVA-1.5 only ("pad" images, where theirs is ViT-only): their "anyres" path (LLaVA-NeXT) halves the target per
  crop and prunes again at the LLM's layer 1, which vtprune does not run;
- a crop at or under its target keeps everything and carries its scores unchanged (zeros before any): theirs stop
  updating too, and nothing reads them again.
"""

import math

import torch

from vtprune.strategies.base import Selection, register_strategy


def flow_score(cls_attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One layer's score of ``n`` patches: (CLS attention share + semantic share) · the value's L1 norm."""
    return (cls_attention / cls_attention.sum() + semantic / semantic.sum()) * values.abs().sum(dim=-1)


def prune_count(cls_attention: torch.Tensor, rpl: int, target: int) -> int:
    """Patches to drop at a layer with ``rpl`` (> 0) pruning layers left: fewer the flatter the CLS attention."""
    n = len(cls_attention)
    p = cls_attention / cls_attention.sum()
    ratio = -torch.special.xlogy(p, p).sum() / math.log(n)  # xlogy: a patch with zero attention adds 0, not NaN
    return int(torch.round((n - target) / math.sqrt(rpl) * (1 - ratio**2)))


@register_strategy(
    "flowcut",
    needs=("vision_layer_attention", "vision_semantic", "vision_values"),
    stage="vision",
    placement={"after": "layer"},
)
def keep_flowcut(signals, budgets):
    """FlowCut: vision-tower patches pruned by cumulative CLS-attention, semantic and value-norm flow (adaptive)."""
    if signals.stages is None:
        raise ValueError("flowcut: Signals.stages (the vision layers it is called at) is required")
    # a one-layer tower still reaches its target at its only layer
    rpl = max(signals.stages - 2, 0) - signals.stage
    valid_all = signals.valid
    width = valid_all.shape[1]
    out = []
    for b, k in enumerate(budgets.tolist()):
        target = max(int(k), 1)
        idx = torch.nonzero(valid_all[b]).flatten()
        n = len(idx)
        carry = (torch.zeros(width, dtype=torch.float64, device=valid_all.device) if signals.carry is None
                 else signals.carry[b].to(valid_all.device, torch.float64).clone())
        if n <= target:
            out.append(Selection(idx, carry=carry))
            continue
        attention = signals.vision_layer_attention[b, idx].double()
        score = flow_score(attention, signals.vision_semantic[b, idx].double(), signals.vision_values[b, idx].double())
        if signals.carry is not None:
            score = 0.5 * carry[idx] + 0.5 * score
        carry[idx] = score
        if rpl < 0 or rpl % 2:
            out.append(Selection(idx, carry=carry))
            continue
        count = target if rpl == 0 else max(n - prune_count(attention, rpl, target), target)
        order = torch.sort(score, descending=True, stable=True).indices[:count]
        out.append(Selection(idx[order], carry=carry))
    return out
