"""adav on hand-made embeddings: relevance, the guaranteed share, the k1/k2 split, de-duplication, batches."""

import pytest
import torch

from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.adav import best_split, text_relevance

ADAV = STRATEGIES.get("adav")


def with_relevance(weights):
    """2-D features whose relevance to the text token (1, 0) is ``weights / sum(weights)``.

    cos(text, v) = 1 + ln(w_v) / 100, so softmax_v(100 · cos) = w_v / Σ w.
    """
    c = 1 + torch.log(torch.tensor(weights, dtype=torch.float64)) / 100
    return torch.stack([c, torch.sqrt(1 - c**2)], dim=-1).float()


def adav_signals(weights, saliency):
    """One sample per row, all valid; each sample's text is (1, 0) and a padding text token (0, 1)."""
    features = torch.stack([with_relevance(w) for w in weights])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(len(weights), 2, 2)
    return Signals(
        valid=torch.ones(features.shape[:2], dtype=torch.bool),
        features=features,
        cls_attention=torch.tensor(saliency),
        text_embeds=text,
        text_valid=torch.tensor([[True, False]] * len(weights)),
    )


# 12 tokens: relevance high on 0..5, saliency high on 6..11, no value tied
SPLIT_WEIGHTS = [1.0, 0.5, 0.12, 0.11, 0.10, 0.09, 0.01, 0.009, 0.008, 0.007, 0.006, 0.005]
SPLIT_SALIENCY = [0.006, 0.005, 0.004, 0.003, 0.002, 0.001, 0.40, 0.12, 0.11, 0.10, 0.09, 0.08]


def test_relevance_is_the_max_over_text_of_a_softmax_over_image_tokens():
    # text A = e0, text B = e1, text C = e2 (marked invalid). Tokens 0 and 1 both match A (cosine 1, norms
    # differ), so A's softmax splits 1/2, 1/2; token 2 alone matches B -> 1; token 3 matches only the
    # invalid C -> ~0; token 4 would match A too but is padding: outside the softmax, relevance 0.
    text = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    features = torch.tensor([[[2.0, 0, 0], [1.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0], [1.0, 0, 0]]])
    s = Signals(
        valid=torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool),
        features=features,
        text_embeds=text,
        text_valid=torch.tensor([[True, True, False]]),
    )
    assert torch.allclose(text_relevance(s), torch.tensor([[0.5, 0.5, 1.0, 0.0, 0.0]]), atol=1e-6)


def test_relevance_follows_the_designed_weights():
    s = adav_signals([[1.0, 0.5, 0.25, 0.25]], [[0.0] * 4])
    assert torch.allclose(text_relevance(s), torch.tensor([[0.5, 0.25, 0.125, 0.125]]), atol=1e-5)


def test_best_split_takes_the_interior_maximum_of_the_product():
    # k1 = 1: 0.5 · 0.9 = 0.45; k1 = 2: 0.6 · 0.6 = 0.36; k1 = 3: 0.7 · 0.3 = 0.21; k1 = 0, 4: 0
    assert best_split(torch.tensor([0.5, 0.1, 0.1, 0.1]), torch.tensor([0.3, 0.3, 0.3, 0.3]), 4) == (1, 3)
    # equal products (k1 = 1 and k1 = 2 both give 1): the smallest k1
    assert best_split(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), 3) == (1, 2)


def test_adav_splits_the_rest_of_the_budget_where_the_product_is_largest():
    # budget ceil(0.5 · 12) = 6; guaranteed g = floor(0.25 · 6) = floor(1.5) = 1 from each ranking:
    # relevance -> 0, saliency -> 6. The rest R = 4 is split over the next relevance values
    # (tokens 1, 2, 3, ...: 0.5, 0.12, 0.11, all / 1.965) and saliency values (7, 8, 9, ...: 0.12, 0.11, 0.10):
    #   k1 = 1: 0.5 · (0.12 + 0.11 + 0.10) = 0.165     <- maximum
    #   k1 = 2: 0.62 · (0.12 + 0.11) = 0.1426
    #   k1 = 3: 0.73 · 0.12 = 0.0876;  k1 = 0, 4: 0
    # so relevance keeps 0, 1 and saliency 6, 7, 8, 9. (A half/half split would keep 2 instead of 9; rounding
    # g up to 2 would too: then k1 = k2 = 1 on the rest.)
    s = adav_signals([SPLIT_WEIGHTS], [SPLIT_SALIENCY])
    assert ADAV.select(s, 0.5)[0].tolist() == [0, 1, 6, 7, 8, 9]


def test_budget_thres_guarantees_each_ranking_its_share():
    s = adav_signals([SPLIT_WEIGHTS], [SPLIT_SALIENCY])
    # budget_thres 0.5: g = 3 from each ranking, nothing left to split -> 0, 1, 2 and 6, 7, 8; token 2 is kept
    # only because of the guarantee (the free split below prefers saliency's 9)
    assert ADAV.select(s, 0.5, budget_thres=0.5)[0].tolist() == [0, 1, 2, 6, 7, 8]
    # budget_thres 0: the whole budget is split: k1 = 2 gives 1.5 · 0.73 = 1.095, above k1 = 3
    # (1.62 · 0.63 = 1.0206) and k1 = 1 (1.0 · 0.82 = 0.82)
    assert ADAV.select(s, 0.5, budget_thres=0.0)[0].tolist() == [0, 1, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="budget_thres"):
        ADAV.select(s, 0.5, budget_thres=0.6)


# 8 tokens: relevance order 3, 1, 2, 5, 0, 4, 6, 7; saliency order 1, 3, 2, 7, 0, 4, 5, 6
DUP_WEIGHTS = [0.06, 0.5, 0.25, 1.0, 0.03, 0.12, 0.015, 0.007]
DUP_SALIENCY = [0.01, 0.5, 0.1, 0.3, 0.008, 0.006, 0.004, 0.05]


def test_tokens_in_both_rankings_count_once_and_the_budget_is_refilled():
    # budget ceil(0.5 · 8) = 4, g = floor(0.25 · 4) = 1, R = 2 -> k1 = k2 = 1 (any other split has an empty sum):
    # relevance keeps 3, 1 and saliency 1, 3 -> only 2 distinct tokens (the authors' code feeds 3, 1, 1, 3).
    # Refill walks the interleaved rest, relevance first: relevance 2 (new), saliency 2 (kept already),
    # relevance 5 (new) -> budget reached. (Taking the next new token of each ranking would give 7 instead of 5.)
    s = adav_signals([DUP_WEIGHTS], [DUP_SALIENCY])
    assert ADAV.select(s, 0.5)[0].tolist() == [1, 2, 3, 5]


def test_batch_of_two_with_padding():
    # sample 1 has the 8 tokens above and 4 padding tokens aligned with the text and with the top saliency.
    # Each sample's second text token (0, 1) is padding: counted, it would make token 11 of sample 0
    # (the smallest weight, so the largest sine) the most relevant.
    pad_features = [1.0] * 4  # weight 1 -> cosine 1 with the text, the most relevant if it were a candidate
    s = adav_signals([SPLIT_WEIGHTS, DUP_WEIGHTS + pad_features], [SPLIT_SALIENCY, DUP_SALIENCY + [1.0] * 4])
    s.valid[1, 8:] = False
    kept = ADAV.select(s, 0.5)
    assert [k.tolist() for k in kept] == [[0, 1, 6, 7, 8, 9], [1, 2, 3, 5]]
    # the same selection without the padding text token's mask would differ in sample 0
    s.text_valid[:] = True
    assert ADAV.select(s, 0.5)[0].tolist() != [0, 1, 6, 7, 8, 9]


def test_adav_keep_all_keeps_every_valid_token():
    s = adav_signals([SPLIT_WEIGHTS, DUP_WEIGHTS + [1.0] * 4], [SPLIT_SALIENCY, DUP_SALIENCY + [1.0] * 4])
    s.valid[1, 8:] = False
    assert [k.tolist() for k in ADAV.select(s, 1.0)] == [list(range(12)), list(range(8))]
