"""cls_saliency on hand-made CLS→patch attention: top-k of valid tokens, padding never kept."""

import torch

from vtprune.strategies import STRATEGIES, Signals

CLS = STRATEGIES.get("cls_saliency")


def test_topk_of_cls_attention_sorted():
    att = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0]])
    signals = Signals(valid=torch.ones(1, 6, dtype=torch.bool), cls_attention=att)
    assert [k.tolist() for k in CLS.select(signals, 0.5)] == [[1, 3, 4]]
    assert [k.tolist() for k in CLS.select(signals, 0.01)] == [[3]]  # at least one token


def test_padding_never_kept_and_budget_per_sample():
    att = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4, 0.9, 0.8]])
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    kept = CLS.select(Signals(valid=valid, cls_attention=att), 0.5)
    assert [k.tolist() for k in kept] == [[1, 3, 4], [2, 3]]


def test_declaration():
    assert CLS.needs == ("cls_attention",)
