"""none, random and uniform on hand-made signals: exact indices."""

import torch

from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.base import sample_generators


def signals(valid_rows, groups=None, seed=0):
    valid = torch.tensor(valid_rows, dtype=torch.bool)
    return Signals(
        valid=valid,
        groups=None if groups is None else torch.tensor(groups),
        generators=sample_generators(seed, [bytes([b]) for b in range(len(valid))]),
    )


def test_budget_rounds_up_and_keeps_one():
    assert budget(68, 0.5) == 34
    assert budget(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert budget(17, 0.25) == 5
    assert budget(10, 0.01) == 1


def test_none_keeps_every_valid_token_and_no_padding():
    s = signals([[1, 1, 1, 1], [0, 0, 1, 1]])
    kept = STRATEGIES.get("none").select(s, 0.25)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3], [2, 3]]


def test_random_is_reproducible_with_the_seed_and_changes_with_it():
    s = signals([[1] * 20, [0] * 4 + [1] * 16])
    strategy = STRATEGIES.get("random")
    a = [k.tolist() for k in strategy.select(s, 0.25)]
    b = [k.tolist() for k in strategy.select(signals([[1] * 20, [0] * 4 + [1] * 16]), 0.25)]
    c = [k.tolist() for k in strategy.select(signals([[1] * 20, [0] * 4 + [1] * 16], seed=7), 0.25)]
    assert a == b
    assert a != c
    assert [len(k) for k in a] == [5, 4]
    assert all(i >= 4 for i in a[1])  # padding never kept
    assert all(x == sorted(x) and len(set(x)) == len(x) for x in a)


def test_uniform_is_evenly_spaced_within_each_group():
    # two tiles of 8 tokens; keep 0.5 -> 4 per tile at positions 0, 2, 5, 7 of each
    s = signals([[1] * 16], groups=[[0] * 8 + [1] * 8])
    kept = STRATEGIES.get("uniform").select(s, 0.5)
    assert kept[0].tolist() == [0, 2, 5, 7, 8, 10, 13, 15]


def test_uniform_splits_the_budget_by_group_size_and_skips_padding():
    # group 0 has 6 valid tokens, group 1 has 3, then 3 padding; keep 1/3 -> budget 3 -> 2 + 1
    s = signals([[1] * 9 + [0] * 3], groups=[[0] * 6 + [1] * 3 + [-1] * 3])
    kept = STRATEGIES.get("uniform").select(s, 1 / 3)
    assert kept[0].tolist() == [0, 5, 7]


def test_uniform_single_token_takes_the_middle():
    s = signals([[1] * 5])
    assert STRATEGIES.get("uniform").select(s, 0.2)[0].tolist() == [2]
