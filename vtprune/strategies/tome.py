"""ToMe: bipartite soft matching inside the vision tower, a few tokens merged in every layer.

Token Merging (Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, ICLR 2023, "Token Merging: Your ViT But Faster",
arXiv 2210.09461), as LightCompress (ModelTC/LightCompress, the ``llmc`` token-reduction benchmark) runs it on
LLaVA: ``llmc/compression/token_reduction/tome.py`` (``bipartite_soft_matching``, ``merge_wavg``,
``tome_CLIPEncoderLayer_forward``), read for the rule, not copied:

- in each CLIP encoder layer, between the attention and the MLP: the metric is the layer's keys, averaged over
  heads; the tokens alternate into two sets ``A`` (even places, the CLS token's included) and ``B`` (odd); each
  ``A`` token's most
  cosine-similar ``B`` token is its edge; the ``r`` ``A`` tokens with the strongest edges merge into their ``B``
  token, which becomes the plain mean of itself and what merged into it; the CLS token is never merged;
- ``r`` is at most half of the tokens; llmc gives every layer the same ``r`` (or ``start + i · step``).

vtprune's placement ``vision`` (the adapter replaces the tower layers' forward for one call, ``LlavaAdapter``):
this function is one layer's matching. Its signal ``vision_keys`` is the layer's head-mean keys of one crop's
tokens; ``valid`` is False for the CLS token (never a candidate); ``budgets`` are the tokens each crop keeps after
the layer, from ``schedule``. Its selection is applied to the hidden states; the layers after it see the
survivors; the projector reads the survivors, each in its own slot of the image.

Deliberate differences:

- the count: ``schedule`` spreads the reduction to ``ceil(keep_ratio · patches)`` over the layers up to the one
  whose output the projector reads, front-loaded (``ceil`` of what is left over the layers left), so that every
  keep ratio can be compared; llmc takes a fixed ``r`` per layer from its config;
- a layer asked to keep fewer than half of its tokens (shallow towers: vtprune's tiny and micro models) repeats
  the matching on what is left until it may stop; llmc caps ``r`` at half, missing the count;
- order: survivors stay in their original order (so the next layer's alternation and the LLM's slots follow the
  image); llmc reorders to ``[unmerged A, B]`` after every layer;
- ties: the lower ``B`` token for an edge (first maximum), the lower ``A`` token among equal edges (stable sort);
- no size-weighted averaging and no proportional attention (the ToMe paper's), as llmc.
"""

import math

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Selection, budget, register_strategy


def schedule(num_visual: int, keep_ratio: float, stages: int) -> list[int]:
    """The tokens (patches) left after each of ``stages`` vision layers, ending at ``ceil(keep_ratio · patches)``:
    each layer removes its share of what is left to remove, rounded up."""
    target = num_visual if keep_ratio >= 1 else budget(num_visual, keep_ratio)
    counts, left = [], num_visual
    for layer in range(stages):
        left -= math.ceil((left - target) / (stages - layer))
        counts.append(left)
    return counts


def matching_round(metric: torch.Tensor, seq: list[int], valid: set[int], r: int) -> dict[int, list[int]]:
    """One bipartite soft matching over the sequence ``seq`` (token ids in order): ``A`` its even places, ``B`` its
    odd ones, tokens not ``valid`` (the CLS) holding their place but never matched. ``{B token: [A tokens]}``."""
    a = [t for t in seq[0::2] if t in valid]
    b = [t for t in seq[1::2] if t in valid]
    r = min(r, len(a)) if b else 0
    if r <= 0:
        return {}
    unit = F.normalize(metric, dim=-1)
    scores = unit[a] @ unit[b].T  # [A, B]
    best, partner = scores.max(dim=1)  # first maximum: the lower B token
    strongest = torch.sort(best, descending=True, stable=True).indices[:r]
    merges: dict[int, list[int]] = {}
    for i in strongest.tolist():
        merges.setdefault(b[int(partner[i])], []).append(a[i])
    return merges


@register_strategy("tome", needs=("vision_keys",), stage="vision", merges=True, schedule=schedule,
                   placement={"after": "attention"})
def keep_tome(signals, budgets):
    """ToMe: bipartite soft matching of the vision tower's tokens by key similarity, merged in every layer (as llmc)."""
    out = []
    width = signals.valid.shape[1]
    for b, k in enumerate(budgets.tolist()):
        seq = list(range(width))
        valid = set(torch.nonzero(signals.valid[b]).flatten().tolist())
        metric = signals.vision_keys[b].double().cpu().clone()
        rows: dict[int, torch.Tensor] = {}  # a merged token as weights over the layer's input tokens

        def row(t: int) -> torch.Tensor:
            return rows[t] if t in rows else F.one_hot(torch.tensor(t), width).double()

        while len(valid) > max(k, 1):
            merges = matching_round(metric, seq, valid, len(valid) - max(k, 1))
            if not merges:
                break
            for dst, srcs in merges.items():
                group = [dst, *srcs]
                # a repeated round (shallow towers) matches a merged token by the mean of its sources' keys
                metric[dst] = metric[group].mean(dim=0)
                rows[dst] = torch.stack([row(t) for t in group]).mean(dim=0)
            gone = {t for srcs in merges.values() for t in srcs}
            seq = [t for t in seq if t not in gone]
            valid -= gone
        alive = [t for t in seq if t in valid]
        device = signals.valid.device
        anchors = [t for t in alive if t in rows]
        weights = torch.stack([rows[t] for t in anchors]).float() if anchors else torch.zeros(0, width)
        out.append(Selection(torch.tensor([t for t in alive if t not in rows], dtype=torch.long, device=device),
                             torch.tensor(anchors, dtype=torch.long, device=device), weights.to(device)))
    return out
