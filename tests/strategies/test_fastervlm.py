"""fastervlm on hand-made CLS attention: top-k, ties to the lower index, padding never kept."""

import torch

from vtprune.strategies import STRATEGIES, Signals


def test_fastervlm_keeps_the_highest_cls_attention():
    cls = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    s = Signals(valid=torch.ones(1, 4, dtype=torch.bool), cls_attention=cls)
    assert STRATEGIES.get("fastervlm").select(s, 0.5)[0].tolist() == [1, 3]
    assert STRATEGIES.get("fastervlm").needs == ("cls_attention",)


def test_fastervlm_ties_go_to_the_lower_index_and_padding_is_never_kept():
    # sample 0: 0.3 at 1, 2 and 3 -> budget 2 keeps 1 and 2; sample 1: padding at 3 has the top score
    cls = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.2, 0.1, 0.3, 0.9]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    kept = STRATEGIES.get("fastervlm").select(Signals(valid=valid, cls_attention=cls), 0.5)
    assert [k.tolist() for k in kept] == [[1, 2], [0, 2]]


def test_fastervlm_keep_all_keeps_every_valid_token():
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    s = Signals(valid=valid, cls_attention=torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.2, 0.1, 0.3, 0.9]]))
    assert [k.tolist() for k in STRATEGIES.get("fastervlm").select(s, 1.0)] == [[0, 1, 2, 3], [0, 1, 2]]
