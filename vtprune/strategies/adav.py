"""AdaV: text-to-image relevance and CLS saliency, with an adaptive split of the budget between them."""

import math
from itertools import zip_longest

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, register_strategy, topk_valid


def text_relevance(signals) -> torch.Tensor:
    """[B, N] relevance ``r(v) = max_t softmax_v(100 · cos(text_t, image_v))``; 0 on padding.

    The softmax runs over the sample's valid visual tokens only, the max over its valid text tokens only.
    """
    text = F.normalize(signals.text_embeds.float(), dim=-1)
    image = F.normalize(signals.features.float(), dim=-1)
    valid = signals.valid
    if text.shape[1] == 0:  # no text to be relevant to: every token ties, the ranking falls back to index order
        return torch.zeros(valid.shape, device=valid.device)
    logits = 100 * text @ image.transpose(1, 2)  # [B, T, N]
    probs = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
    if signals.text_valid is not None:
        probs = probs.masked_fill(~signals.text_valid[:, :, None], 0.0)  # probabilities are >= 0: 0 never wins
    return probs.max(dim=1).values.masked_fill(~valid, 0.0)


def best_split(relevance: torch.Tensor, saliency: torch.Tensor, rest: int) -> tuple[int, int]:
    """``k1 + k2 = rest`` maximising ``(Σ top-k1 relevance) · (Σ top-k2 saliency)``; ties → the smallest k1.

    Both inputs are score lists already sorted in descending order, each at least ``rest`` long.
    """
    zero = relevance.new_zeros(1, dtype=torch.float64)
    rel_sums = torch.cat([zero, relevance.double().cumsum(0)])[: rest + 1]
    sal_sums = torch.cat([zero, saliency.double().cumsum(0)])[: rest + 1]
    k1 = int(torch.argmax(rel_sums * sal_sums.flip(0)))  # argmax returns the first maximum
    return k1, rest - k1


def merge_rankings(by_rel: torch.Tensor, by_sal: torch.Tensor, n_rel: int, n_sal: int, k: int) -> torch.Tensor:
    """The top ``n_rel`` of one ranking and top ``n_sal`` of the other, each token once, refilled to ``k``.

    Refill walks the rest of the two rankings interleaved position by position (relevance, saliency,
    relevance, ...), adding tokens not yet kept. Both rankings hold every valid token, so it reaches ``k``.
    """
    kept = dict.fromkeys(by_rel[:n_rel].tolist() + by_sal[:n_sal].tolist())
    for pair in zip_longest(by_rel[n_rel:].tolist(), by_sal[n_sal:].tolist()):
        for idx in pair:
            if len(kept) < k and idx is not None:
                kept.setdefault(idx)
    return torch.tensor(list(kept), dtype=torch.long, device=by_rel.device)


@register_strategy(
    "adav",
    needs=("text_embeds", "features", "cls_attention"),
    options={"budget_thres": Option(0.25, help="share of the budget each ranking gets unconditionally", bounds=(0.0, 0.5))},
)
def keep_adav(signals, budgets, budget_thres=0.25):
    """AdaV: text relevance + CLS saliency, the budget split adaptively between the two rankings.

    Relevance ``r(v) = max_t softmax_v(100 · cos(text_t, image_v))`` (``text_relevance``); saliency is the
    vision encoder's CLS→patch attention. For a budget ``B``, each ranking first gets its top
    ``g = floor(budget_thres · B)`` tokens unconditionally, as in the authors' code (there ``int(2k · 0.25)``
    with ``2k = B``). The rest ``R = B − 2g`` is split ``k1 + k2 = R`` to maximise
    ``(Σ next k1 relevance) · (Σ next k2 saliency)`` over k1 = 0..R (ties → smallest k1). The union is
    de-duplicated and refilled to exactly ``B`` by alternating down the two rankings (relevance first).

    Differences from the authors' released code (``llava_llama.py``, method ``adav``):

    - they keep duplicates (a token in both rankings is fed twice and the image gets fewer distinct
      tokens than the budget); vtprune counts it once and refills to exactly ``B``;
    - they assume batch size 1; vtprune selects per sample, padding never a candidate;
    - they hard-code the prompt prefix length (35 or 10 tokens) and 576 tokens per crop; vtprune's
      adapter finds the image tokens from ``input_ids``;
    - they drop LLaVA-NeXT's unpad / newline layout; vtprune follows the model's own layout;
    - their saliency candidates are the top ``2k / crops`` of each crop; vtprune ranks saliency over all
      of a sample's tokens together.
    """
    if not 0 <= budget_thres <= 0.5:
        raise ValueError(f"adav: budget_thres must be between 0 and 0.5, got {budget_thres}")
    relevance = text_relevance(signals)
    saliency = signals.cls_attention.float()
    kept = []
    for b, k in enumerate(budgets.tolist()):
        valid = signals.valid[b]
        by_rel = topk_valid(relevance[b], valid, len(valid))
        by_sal = topk_valid(saliency[b], valid, len(valid))
        sure = math.floor(round(budget_thres * k, 6))
        k1, k2 = best_split(relevance[b][by_rel[sure:]], saliency[b][by_sal[sure:]], k - 2 * sure)
        kept.append(merge_rankings(by_rel, by_sal, sure + k1, sure + k2, k))
    return kept
