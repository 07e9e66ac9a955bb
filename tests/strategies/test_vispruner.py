"""vispruner on hand-made tokens: important by CLS attention, diverse by iterative removal of duplicates."""

import math

import pytest
import torch

import vtprune.strategies.vispruner  # noqa: F401  (registers "vispruner" before the registry lists it)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.vispruner import remove_duplicates

VISPRUNER = STRATEGIES.get("vispruner")

# 10 tokens. CLS attention order: 2 (.30), 4 (.20), 6 (.15), 0 (.10), 9 (.06), 8 (.05), 3 (.04), 7 (.03), 1, 5
CLS = [0.10, 0.02, 0.30, 0.04, 0.20, 0.01, 0.15, 0.03, 0.05, 0.06]
FEATURES = [
    [1.0, 1.0],  # 0: important
    [-3.0, -3.0],  # 1: far from 8, 7, 5: best cosine 0.707 (to 5); a raw dot product would rank it first (3)
    [0.0, -1.0],  # 2: important
    [0.1, 1.0],  # 3: near 7: cosine 0.995
    [1.0, -1.0],  # 4: important
    [-1.0, 0.0],  # 5
    [-1.0, 1.0],  # 6: important
    [0.0, 1.0],  # 7
    [1.0, 0.0],  # 8
    [2.0, 0.0],  # 9: the same direction as 8: cosine 1
]


def signals(cls=CLS, features=FEATURES):
    return Signals(
        valid=torch.ones(1, len(cls), dtype=torch.bool),
        cls_attention=torch.tensor([cls]),
        features=torch.tensor([features]),
    )


def at_angles(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64)


def test_important_then_diverse_by_hand():
    # budget ceil(0.8 · 10) = 8: 4 important (2, 4, 6, 0) and 4 diverse. Residual, in attention order:
    # 9, 8, 3, 7, 1, 5 (R = 6); r = min(8, 6 - 4) = 2. a = 9, 3, 1 (even positions), b = 8, 7, 5;
    # best cosine to b: 9 -> 1.0, 3 -> 0.995, 1 -> 0.707: drop 9 and 3. Left: 1, 8, 7, 5.
    assert VISPRUNER.select(signals(), 0.8)[0].tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    # top-8 attention alone would have dropped 1 and 5, the two least attended
    assert sorted(torch.tensor(CLS).argsort(descending=True)[:8].tolist()) == [0, 2, 3, 4, 6, 7, 8, 9]


def test_important_ratio_floor_and_extremes():
    # budget 5, ratio 0.5: floor(2.5) = 2 important (2, 4), 3 diverse from 6, 0, 9, 8, 3, 7, 1, 5 (R = 8):
    # r = min(8, 8 - 3, 4 a tokens) = 4: a = 6, 9, 3, 1 all go, left b = 0, 8, 7, 5. Then R = 4, r = 1:
    # a = 0, 7; b = 8, 5; 0 -> max(0.707, -0.707) = 0.707, 7 -> max(0, 0) = 0: drop 0. Left 7, 8, 5.
    assert VISPRUNER.select(signals(), 0.5)[0].tolist() == [2, 4, 5, 7, 8]
    # ratio 1.0 is plain top-k attention; ratio 0.0 keeps diverse tokens only
    assert VISPRUNER.select(signals(), 0.5, important_ratio=1.0)[0].tolist() == [0, 2, 4, 6, 9]
    assert len(VISPRUNER.select(signals(), 0.5, important_ratio=0.0)[0]) == 5


def test_removal_rounds_by_hand():
    # one drop per round, residual 0..4 at 0, 10, 55, 90, 95 degrees, keep 2:
    # round 1: a = 0, 2, 4; b = 1, 3; closest b: 0 -> 10 deg, 2 -> 35, 4 -> 5: drop 4; then 0, 2 (by score), 1, 3
    # round 2: a = 0, 1; b = 2, 3; 0 -> 55 deg, 1 -> 45: drop 1; residual 0, 2, 3
    # round 3: a = 0, 3; b = 2; 0 -> 55 deg, 3 -> 35: drop 3; residual 0, 2
    unit = at_angles([0, 10, 55, 90, 95])
    assert remove_duplicates(unit, torch.arange(5), 2, per_round=1).tolist() == [0, 2]
    # the authors' 8 per round: r = min(8, 3) = 3 drops every a token in one round
    assert remove_duplicates(unit, torch.arange(5), 2).tolist() == [1, 3]


def test_ties_go_to_the_lower_index():
    # equal attention, identical vectors. Budget 5 of 7: important 0, 1; residual 2..6, r = min(8, 2) = 2:
    # a = 2, 4, 6 all score 1.0, the earlier ones are dropped (2, 4): left 6, 3, 5
    s = signals(cls=[0.1] * 7, features=[[1.0, 0.0]] * 7)
    assert VISPRUNER.select(s, 5 / 7)[0].tolist() == [0, 1, 3, 5, 6]
    assert VISPRUNER.select(s, 5 / 7, important_ratio=1.0)[0].tolist() == [0, 1, 2, 3, 4]


def test_padding_never_kept_and_batched_equals_per_sample():
    # sample 1 has 6 valid tokens; its padding has the highest attention and distinct vectors
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    cls = torch.tensor([CLS, CLS[:6] + [9.0] * 4])
    features = torch.tensor([FEATURES, FEATURES[:6] + [[0.3, 0.7], [0.9, -0.2], [-0.4, 0.5], [0.2, 0.2]]])
    s = Signals(valid=valid, cls_attention=cls, features=features)
    for ratio in (0.2, 0.5, 0.8, 1.0):
        both = VISPRUNER.select(s, ratio)
        alone = [VISPRUNER.select(signals(), ratio)[0], VISPRUNER.select(signals(CLS[:6], FEATURES[:6]), ratio)[0]]
        assert [x.tolist() for x in both] == [x.tolist() for x in alone]
        assert max(both[1].tolist()) < 6 and len(both[1]) == budget(6, ratio)


def test_budget_respected_over_ratios():
    gen = torch.Generator().manual_seed(0)
    n = 12
    s = Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        cls_attention=torch.rand(1, n, generator=gen),
        features=torch.randn(1, n, 3, generator=gen),
    )
    for ratio in (0.0, 0.25, 0.5, 0.9, 1.0):
        for k in range(1, n + 1):
            kept = VISPRUNER.select(s, k / n, important_ratio=ratio)[0].tolist()
            assert len(set(kept)) == len(kept) == budget(n, k / n) == k


def test_option_bounds_are_enforced_by_the_config():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "vispruner", "options": options}}
        )

    assert load({"important_ratio": 0.25}).pruning.options == {"important_ratio": 0.25}
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match="important_ratio"):
            load({"important_ratio": bad})
