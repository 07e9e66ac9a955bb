"""fastv on hand-made head scores: head-mean top-k, ties to the lower index, padding never kept."""

import torch

from vtprune.strategies import STRATEGIES, Signals


def test_fastv_is_declared_in_llm_with_its_default_layer_as_placement():
    s = STRATEGIES.get("fastv")
    assert (s.needs, s.stage) == (("last_token_attention",), "in_llm")
    assert s.placement == {"layer": 2} and s.options == {}


def test_fastv_ranks_by_the_mean_over_heads():
    # head 0 likes token 0, head 1 token 1, both like token 2 a bit: the means are 3, 3, 4 -> token 2,
    # which no single head ranks first (a max over heads would keep 0)
    scores = torch.tensor([[[6.0, 0.0, 4.0], [0.0, 6.0, 4.0]]])
    s = Signals(valid=torch.ones(1, 3, dtype=torch.bool), last_token_attention=scores)
    assert STRATEGIES.get("fastv").select(s, 1 / 3)[0].tolist() == [2]


def test_fastv_breaks_ties_by_lower_index():
    # means [2, 3, 3, 0, 2]: budget 3 keeps 1, 2 and then 0 (tied with 4 at 2, lower index wins)
    scores = torch.tensor([[[1.0, 5.0, 2.0, 0.0, 2.0], [3.0, 1.0, 4.0, 0.0, 2.0]]])
    s = Signals(valid=torch.ones(1, 5, dtype=torch.bool), last_token_attention=scores)
    assert STRATEGIES.get("fastv").select(s, 0.4)[0].tolist() == [1, 2]
    assert STRATEGIES.get("fastv").select(s, 0.6)[0].tolist() == [0, 1, 2]


def test_fastv_batch_never_keeps_padding():
    # sample 1's padding (position 0) has the highest score; budgets are ceil(0.5 * 4) = 2 and ceil(0.5 * 3) = 2
    scores = torch.tensor([[[0.1, 0.4, 0.3, 0.2]], [[9.0, 0.1, 0.3, 0.2]]])
    valid = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    kept = STRATEGIES.get("fastv").select(Signals(valid=valid, last_token_attention=scores), 0.5)
    assert [k.tolist() for k in kept] == [[1, 2], [2, 3]]


def test_fastv_keep_all_keeps_every_valid_token():
    valid = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    s = Signals(valid=valid, last_token_attention=torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)))
    assert [k.tolist() for k in STRATEGIES.get("fastv").select(s, 1.0)] == [[0, 1, 2, 3], [1, 2, 3]]
