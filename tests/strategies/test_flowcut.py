"""flowcut on hand-made layer signals: the flow score, the entropy-adaptive count, pruning only where the layers left
to prune in (rpl) are even, the cumulative score carried from layer to layer, exactly the target at the end."""

import itertools
import math

import pytest
import torch

import vtprune.strategies.flowcut  # noqa: F401  (registers "flowcut")
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.flowcut import flow_score, prune_count

FLOWCUT = STRATEGIES.get("flowcut")

# One crop: the CLS (index 0, not valid) and six patches. The CLS columns are large on purpose: the shares are over
# the patches only. Patch CLS attention 0.2 .1 .1 .05 .025 .025 (sum .5) -> shares .4 .2 .2 .1 .05 .05; semantic
# .04 .04 .04 .04 .12 .12 (sum .4) -> .1 .1 .1 .1 .3 .3; summed: .5 .3 .3 .2 .35 .35; value L1 norms 2 2 2 2.5 1 4
# -> scores 1.0 .6 .6 .5 .35 1.4 (patches 2 and 3 identical: an exact tie). Ranking: 6, 1, 2, 3, 4, 5.
ATTN = [0.5, 0.2, 0.1, 0.1, 0.05, 0.025, 0.025]
SEM = [0.6, 0.04, 0.04, 0.04, 0.04, 0.12, 0.12]
VALUES = [[9.0, 9.0], [1.0, -1.0], [0.0, 2.0], [0.0, 2.0], [-2.0, 0.5], [0.5, -0.5], [-1.0, 3.0]]
SCORES = [0.0, 1.0, 0.6, 0.6, 0.5, 0.35, 1.4]
# A second layer: flat attention and semantic (shares 1/6 each, summed 1/3), norms .6 3.6 .6 .6 3 .6 -> scores
# .2 1.2 .2 .2 1.0 .2
ATTN2 = [0.3] + [0.1] * 6
SEM2 = [0.4] + [0.1] * 6
VALUES2 = [[5.0, 5.0], [0.6, 0.0], [0.0, -3.6], [0.3, 0.3], [-0.6, 0.0], [1.5, 1.5], [0.0, 0.6]]
SCORES2 = [0.0, 0.2, 1.2, 0.2, 0.2, 1.0, 0.2]


def signals(attn=ATTN, sem=SEM, values=VALUES, *, stage, stages, carry=None):
    valid = torch.ones(1, len(attn), dtype=torch.bool)
    valid[0, 0] = False
    s = Signals(valid=valid, vision_layer_attention=torch.tensor([attn]), vision_semantic=torch.tensor([sem]),
                vision_values=torch.tensor([values]))
    s.stage, s.stages, s.carry = stage, stages, carry
    return s


def select(k, s):
    (sel,) = FLOWCUT.selections(s, 1.0, torch.tensor([k]))
    assert sel.num_merged == 0 and 0 not in sel.kept.tolist()  # keeps only; the CLS is the adapter's
    return sel


def test_registration():
    assert FLOWCUT.stage == "vision" and not FLOWCUT.merges and FLOWCUT.schedule is None
    assert FLOWCUT.needs == ("vision_layer_attention", "vision_semantic", "vision_values")
    assert FLOWCUT.placement == {"after": "layer"} and FLOWCUT.options == {}


def test_flow_score_by_hand():
    score = flow_score(torch.tensor(ATTN[1:]).double(), torch.tensor(SEM[1:]).double(),
                       torch.tensor(VALUES[1:]).double())
    assert torch.allclose(score, torch.tensor(SCORES[1:]).double())
    score2 = flow_score(torch.tensor(ATTN2[1:]).double(), torch.tensor(SEM2[1:]).double(),
                        torch.tensor(VALUES2[1:]).double())
    assert torch.allclose(score2, torch.tensor(SCORES2[1:]).double())


def test_prune_count_by_hand():
    # one-hot attention: entropy 0, so (n - target) / sqrt(rpl), rounded half to even as theirs (Tensor.round)
    onehot = lambda n: torch.tensor([1.0] + [0.0] * (n - 1)).double()
    assert prune_count(onehot(6), 2, 1) == 4  # 5 / 1.414 = 3.54
    assert prune_count(onehot(7), 4, 2) == 2  # 5 / 2 = 2.5 -> 2
    assert prune_count(onehot(9), 4, 2) == 4  # 7 / 2 = 3.5 -> 4
    # two of eight patches share the attention: entropy ln 2, ratio ln 2 / ln 8 = 1/3, 1 - 1/9 = 8/9;
    # (8 - 2) · 8/9 = 16/3 -> / sqrt 2 = 3.77 -> 4, / 2 = 2.67 -> 3, / 4 = 1.33 -> 1; any scale of the attention
    two = torch.tensor([3.0, 3.0] + [0.0] * 6).double()
    assert [prune_count(two, rpl, 2) for rpl in (2, 4, 16)] == [4, 3, 1]
    # 4 2 1 1 -> 1/2 1/4 1/8 1/8: entropy 1.75 ln 2, ratio 1.75 / 2 = 7/8, 1 - 49/64 = 15/64; (4 - 1) · 15/64 = 0.70
    assert prune_count(torch.tensor([4.0, 2.0, 1.0, 1.0]).double(), 1, 1) == 1
    # 4 4 2 2 1 1 1 1 -> 1/4 1/4 1/8 1/8 1/16 ×4: entropy (2·2/4 + 2·3/8 + 4·4/16) ln 2 = 2.75 ln 2, ratio
    # 2.75 / 3, 1 - ratio² = 0.15972; (8 - 1) · that = 1.118 -> 1 at rpl 1, 0.559 -> 1 at rpl 4, 0.280 -> 0 at rpl 16
    eight = torch.tensor([4.0, 4.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]).double()
    assert [prune_count(eight, rpl, 1) for rpl in (1, 4, 16)] == [1, 1, 0]
    # flat attention: entropy ratio 1, nothing to prune
    assert prune_count(torch.full((10,), 0.1).double(), 2, 1) == 0


def test_last_pruning_layer_keeps_exactly_the_target():
    # stages 5: rpl = 3 - i, the last pruning layer is i = 3 (rpl 0): the top three by score, 6, 1 and 2 (tie with
    # 3 -> the lower index)
    for k, expected in [(3, [1, 2, 6]), (1, [6]), (2, [1, 6]), (4, [1, 2, 3, 6])]:
        assert select(k, signals(stage=3, stages=5)).kept.tolist() == expected
    # the carry holds the scores over the full width (index = current token), the CLS's 0
    sel = select(3, signals(stage=3, stages=5))
    assert sel.carry.dtype == torch.float64 and sel.carry.shape == (7,)
    assert torch.allclose(sel.carry, torch.tensor(SCORES).double())


def test_only_even_rpl_layers_prune():
    # stages 5: rpl 3, 2, 1, 0, -1 at i = 0..4. The attention is flat (layer 2), so the adaptive count at rpl 2 is 0
    # (n - 0 >= target): every layer but i = 3 keeps all six, i = 3 keeps the target (scores .2 1.2 .2 .2 1 .2:
    # 2 and 5)
    for i in range(5):
        sel = select(2, signals(ATTN2, SEM2, VALUES2, stage=i, stages=5))
        assert sel.kept.tolist() == ([2, 5] if i == 3 else [1, 2, 3, 4, 5, 6]), i
        assert torch.allclose(sel.carry, torch.tensor(SCORES2).double())  # scored at every layer, n > target
    # a skewed attention at rpl 2 prunes adaptively: one-hot over the six patches -> 5 / sqrt 2 = 3.54 -> 4 pruned,
    # keep max(6 - 4, 1) = 2 of the highest scores. Shares 1 0 0 0 0 0 + 1/6 each, norms 1 (all [1, 0]):
    # patch 1 (7/6), then the tie 1/6 -> patch 2
    onehot = [0.5, 1.0, 0, 0, 0, 0, 0]
    args = (onehot, [0.5] + [0.2] * 6, [[1.0, 0.0]] * 7)
    assert select(1, signals(*args, stage=1, stages=5)).kept.tolist() == [1, 2]
    assert select(1, signals(*args, stage=2, stages=5)).kept.tolist() == [1, 2, 3, 4, 5, 6]  # rpl 1: odd
    # rpl 4 (stages 7, i = 1): 5 / 2 = 2.5 -> 2 pruned (half to even), keep 4
    assert select(1, signals(*args, stage=1, stages=7)).kept.tolist() == [1, 2, 3, 4]
    # target 5: 1 / sqrt 2 = .71 -> 1 pruned, keep 5
    assert select(5, signals(*args, stage=1, stages=5)).kept.tolist() == [1, 2, 3, 4, 5]


def test_cumulative_score_through_carry():
    # layer 0 of 5 (rpl 3, odd): nothing pruned, the carry is layer 1's scores
    first = select(3, signals(stage=0, stages=5))
    assert first.kept.tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.allclose(first.carry, torch.tensor(SCORES).double())
    # layer 3 (rpl 0) with that carry: 0.5 · (1 .6 .6 .5 .35 1.4) + 0.5 · (.2 1.2 .2 .2 1 .2)
    # = .6 .9 .4 .35 .675 .8 -> 2, 6, 5; the scores alone would pick 1, 2, 6 (layer 1) or 1, 2, 5 (layer 2)
    sel = select(3, signals(ATTN2, SEM2, VALUES2, stage=3, stages=5, carry=first.carry[None].float()))
    assert sel.kept.tolist() == [2, 5, 6]
    expected = [0.0, 0.6, 0.9, 0.4, 0.35, 0.675, 0.8]
    assert torch.allclose(sel.carry, torch.tensor(expected).double())
    assert select(3, signals(ATTN2, SEM2, VALUES2, stage=3, stages=5)).kept.tolist() == [1, 2, 5]


def test_keep_everything_when_the_budget_covers_the_patches():
    for stage in range(5):
        (sel,) = FLOWCUT.selections(signals(stage=stage, stages=5), 1.0)  # budget ceil(1.0 · 6) = 6
        assert sel.kept.tolist() == [1, 2, 3, 4, 5, 6] and not sel.carry.any()  # not scored: zeros carried
    carry = torch.arange(7.0)[None]
    (sel,) = FLOWCUT.selections(signals(stage=3, stages=5, carry=carry), 1.0, torch.tensor([8]))
    assert sel.kept.tolist() == [1, 2, 3, 4, 5, 6] and torch.equal(sel.carry, carry[0].double())  # unchanged


def test_a_one_layer_tower_prunes_at_its_only_layer():
    assert select(2, signals(stage=0, stages=1)).kept.tolist() == [1, 6]
    assert select(2, signals(stage=1, stages=2)).kept.tolist() == [1, 2, 3, 4, 5, 6]  # rpl -1: never
    with pytest.raises(ValueError, match="stages"):
        select(2, signals(stage=0, stages=None))


def test_batched_with_padding_equals_per_crop():
    # crop 2 has four current patches (pruned further at an earlier layer), padded to crop 1's width
    attn2, sem2, values2 = [0.2, 0.3, 0.1, 0.3, 0.1], [0.1, 0.2, 0.3, 0.2, 0.2], [[0, 0], [1, 1], [2, 0], [0, .5], [1, 2]]
    carry1, carry2 = torch.tensor([0.0, 1, 2, 0, 1, 0, 3]), torch.tensor([0.0, 0.5, 2, 1, 0.1])
    pad = lambda row, fill: row + [fill] * 2
    both = Signals(valid=torch.tensor([[False] + [True] * 6, [False] + [True] * 4 + [False] * 2]),
                   vision_layer_attention=torch.tensor([ATTN, pad(attn2, 0.7)]),
                   vision_semantic=torch.tensor([SEM, pad(sem2, 0.9)]),
                   vision_values=torch.tensor([VALUES, pad(values2, [9.0, 9.0])]))
    for stage, stages in [(3, 5), (1, 5), (0, 5)]:
        both.stage, both.stages, both.carry = stage, stages, torch.stack([carry1, torch.cat([carry2, torch.ones(2)])])
        for k in (1, 2, 3):
            batched = FLOWCUT.selections(both, 1.0, torch.tensor([k, k]))
            alone = [select(k, signals(stage=stage, stages=stages, carry=carry1[None])),
                     select(k, signals(attn2, sem2, values2, stage=stage, stages=stages, carry=carry2[None]))]
            for sel, one in zip(batched, alone):
                assert sel.kept.tolist() == one.kept.tolist()
                assert torch.equal(sel.carry[: len(one.carry)], one.carry)


def test_a_run_through_the_layers_ends_at_the_target():
    # an adapter's loop on random signals: 23 layers, 24 patches to 5; counts never grow, change only at even rpl,
    # and are exactly the target from the last pruning layer (i = 21, rpl 0) on, not before (here 7 at i = 20)
    gen = torch.Generator().manual_seed(0)
    stages, target, alive, carry = 23, 5, torch.arange(25), None
    counts = []
    for i in range(stages):
        t = len(alive)
        attn = torch.softmax(2 * torch.randn(1, t, generator=gen), dim=-1)
        s = signals(attn[0].tolist(), torch.rand(t, generator=gen).tolist(), torch.randn(t, 3, generator=gen).tolist(),
                    stage=i, stages=stages, carry=carry)
        sel = select(target, s)
        keep = torch.cat([torch.zeros(1, dtype=torch.long), sel.kept])
        alive, carry = alive[keep], sel.carry[keep][None]
        counts.append(len(alive) - 1)
        rpl = stages - 2 - i
        if rpl % 2 or rpl < 0:
            assert counts[-1] == (counts[-2] if i else 24), i
    assert counts[-3] > target and counts[-2] == counts[-1] == target
    assert all(a >= b for a, b in itertools.pairwise(counts)) and counts[1] < 24  # rpl 20: pruned early
    assert math.isfinite(float(carry.sum()))
