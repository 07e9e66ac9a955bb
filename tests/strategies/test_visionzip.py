"""visionzip on hand-made tokens: dominant by CLS attention, contextual merges around evenly spaced targets."""

import pytest
import torch

import vtprune.strategies.visionzip  # noqa: F401  (registers "visionzip" before the registry lists it)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.visionzip import split

VISIONZIP = STRATEGIES.get("visionzip")

# 10 tokens. CLS attention: top three are 1 (0.30), 4 (0.20), 8 (0.15), then 9 (0.07), 7 (0.06), 0 (0.05), ...
CLS = [0.05, 0.30, 0.02, 0.01, 0.20, 0.03, 0.04, 0.06, 0.15, 0.07]
FEATURES = [
    [4.0, 0.0],  # 0: a target (norm 4)
    [0.0, 1.0],  # 1: dominant
    [1.0, 0.1],  # 2: -> target 0
    [0.5, 1.0],  # 3: -> target 5 by cosine (0.894 vs 0.447); a raw dot product would pick 0 (2.0 vs 1.0)
    [1.0, 1.0],  # 4: dominant
    [0.0, 1.0],  # 5: a target
    [3.0, 1.0],  # 6: -> target 0 (0.949 vs 0.316)
    [-1.0, 2.0],  # 7: -> target 5 (0.894 vs -0.447)
    [1.0, -1.0],  # 8: dominant
    [1.0, 1.0],  # 9: equally close to both targets (0.7071 exactly twice): the lower target, 0
]


def signals(cls=CLS, features=FEATURES):
    return Signals(
        valid=torch.ones(1, len(cls), dtype=torch.bool),
        cls_attention=torch.tensor([cls]),
        features=torch.tensor([features]),
    )


def test_default_split_and_its_rounding():
    # the authors' settings: 54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192
    assert [split(k, 54 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    # 0.84375 · 10 = 8.44 -> 8;  · 5 = 4.22 -> 4;  · 2 = 1.69 -> 2 (nothing left to merge);  · 1 -> 1
    assert [split(k, 54 / 64) for k in (10, 5, 2, 1)] == [(8, 2), (4, 1), (2, 0), (1, 0)]
    # half up: 0.5 · 5 = 2.5 -> 3; at least one dominant token even at fraction 0
    assert split(5, 0.5) == (3, 2) and split(4, 0.0) == (1, 3) and split(4, 1.0) == (4, 0)


def test_dominant_and_contextual_by_hand():
    # budget ceil(0.5 · 10) = 5, dominant_fraction 0.6 -> 3 dominant (1, 4, 8) + 2 contextual.
    # Left over, in index order: 0, 2, 3, 5, 6, 7, 9 (R = 7); step = 7 // 2 = 3 -> targets at positions 0, 3:
    # tokens 0 and 5. Assigned (see FEATURES): 2, 6, 9 -> 0 and 3, 7 -> 5.
    (sel,) = VISIONZIP.selections(signals(), 0.5, dominant_fraction=0.6)
    assert sel.kept.tolist() == [1, 4, 8]
    assert sel.anchors.tolist() == [0, 5]
    expected = torch.zeros(2, 10)
    expected[0, [0, 2, 6, 9]] = 1 / 4
    expected[1, [3, 5, 7]] = 1 / 3
    assert torch.equal(sel.weights, expected)
    # the merged vectors are the means of their sources: (4+1+3+1, 0+0.1+1+1) / 4 and (0.5+0-1, 1+1+2) / 3
    merged = sel.weights @ torch.tensor(FEATURES)
    assert torch.allclose(merged, torch.tensor([[9 / 4, 2.1 / 4], [-0.5 / 3, 4 / 3]]))


def test_default_fraction_by_hand():
    # budget 5 -> 4 dominant (1, 4, 8, 9) + 1 contextual: left over 0, 2, 3, 5, 6, 7; the single target is the
    # first of them, token 0, and every other token is assigned to it
    (sel,) = VISIONZIP.selections(signals(), 0.5)
    assert sel.kept.tolist() == [1, 4, 8, 9] and sel.anchors.tolist() == [0]
    expected = torch.zeros(1, 10)
    expected[0, [0, 2, 3, 5, 6, 7]] = 1 / 6
    assert torch.equal(sel.weights, expected)


def test_targets_with_nothing_assigned_are_kept_as_they_are():
    # budget 10, fraction 0.6 -> 6 dominant + 4 contextual over the 4 tokens left: each its own target, no merge
    (sel,) = VISIONZIP.selections(signals(), 1.0, dominant_fraction=0.6)
    assert sel.kept.tolist() == list(range(10)) and sel.num_merged == 0


def test_ties_go_to_the_lower_index():
    # equal attention: dominant 0, 1, 2 (fraction 1.0); with 0.5 of budget 4: dominant 0, 1 and the left-over
    # 2..5 give targets at step 4 // 2 = 2: tokens 2 and 4; identical vectors tie to the lower target, 2, so 3
    # and 5 join 2 and target 4 stays alone (kept)
    s = signals(cls=[0.1] * 6, features=[[1.0, 0.0]] * 6)
    assert VISIONZIP.select(s, 0.5, dominant_fraction=1.0)[0].tolist() == [0, 1, 2]
    (sel,) = VISIONZIP.selections(s, 4 / 6, dominant_fraction=0.5)
    assert sel.kept.tolist() == [0, 1, 4] and sel.anchors.tolist() == [2]
    expected = torch.zeros(1, 6)
    expected[0, [2, 3, 5]] = 1 / 3
    assert torch.equal(sel.weights, expected)


def test_padding_never_used_and_batched_equals_per_sample():
    # sample 1 has 6 valid tokens; its padding has the highest attention and copies of the targets' vectors
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    cls = torch.tensor([CLS, CLS[:6] + [9.0] * 4])
    features = torch.tensor([FEATURES, FEATURES[:6] + [[4.0, 0.0]] * 4])
    both = VISIONZIP.selections(Signals(valid=valid, cls_attention=cls, features=features), 0.5, dominant_fraction=0.6)
    alone = [
        VISIONZIP.selections(signals(), 0.5, dominant_fraction=0.6)[0],
        VISIONZIP.selections(signals(CLS[:6], FEATURES[:6]), 0.5, dominant_fraction=0.6)[0],
    ]
    for x, y in zip(both, alone):
        assert x.kept.tolist() == y.kept.tolist() and x.anchors.tolist() == y.anchors.tolist()
        width = y.weights.shape[1]
        assert torch.equal(x.weights[:, :width], y.weights) and not x.weights[:, width:].any()
    assert max(both[1].slots.tolist()) < 6
    # sample 1: budget 3 -> 2 dominant (1, 4) + 1 contextual: target 0 with 2, 3, 5
    assert both[1].kept.tolist() == [1, 4] and both[1].anchors.tolist() == [0]


def test_budget_respected_over_ratios_and_fractions():
    gen = torch.Generator().manual_seed(0)
    n = 12
    s = Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        cls_attention=torch.rand(1, n, generator=gen),
        features=torch.randn(1, n, 3, generator=gen),
    )
    for fraction in (0.0, 0.3, 54 / 64, 1.0):
        for k in range(1, n + 1):
            (sel,) = VISIONZIP.selections(s, k / n, dominant_fraction=fraction)
            assert len(sel.kept) + sel.num_merged == budget(n, k / n) == k
            assert not set(sel.kept.tolist()) & set(sel.anchors.tolist())
            assert torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))
            # each token feeds at most one merge, and never a merge and a kept slot at once
            assert (sel.weights > 0).sum(dim=0).le(1).all() and not sel.weights[:, sel.kept].any()


def test_option_bounds_are_enforced_by_the_config():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "visionzip", "options": options}}
        )

    assert load({"dominant_fraction": 0.5}).pruning.options == {"dominant_fraction": 0.5}
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match="dominant_fraction"):
            load({"dominant_fraction": bad})
    with pytest.raises(ConfigError, match="dominant_fraction"):
        load({"dominant_fraction": "half"})
