"""tome on hand-made keys: one layer's bipartite soft matching (A: even places, B: odd), the CLS never merged,
repeated rounds when a layer must leave fewer than half its tokens, and the per-layer schedule."""

import pytest
import torch

from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.tome import schedule

TOME = STRATEGIES.get("tome")
# token 0 is the CLS (not valid); A = places 2, 4, 6 (0 is the CLS's), B = 1, 3, 5.
# Best edges: 2 -> 1 (cos 1/sqrt(1.01)), 4 -> 3 (the same value: the tie goes to the lower A token, 2),
# 6 -> 3 (cos .707).
KEYS = [[9.0, 9.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [-1.0, 1.0]]


def signals(keys=KEYS, cls=True):
    valid = torch.ones(1, len(keys), dtype=torch.bool)
    valid[0, 0] = not cls
    return Signals(valid=valid, vision_keys=torch.tensor([keys]))


def select(k, s=None):
    (sel,) = TOME.selections(s or signals(), 1.0, torch.tensor([k]))
    return sel


def onehot_mean(*tokens, width=7):
    row = torch.zeros(width)
    for t in tokens:
        row[t] += 1 / len(tokens)
    return row


def test_one_round_merges_the_strongest_edges_first():
    assert select(6).kept.tolist() == [1, 2, 3, 4, 5, 6] and select(6).num_merged == 0
    sel = select(5)  # r = 1: the tie between 2 -> 1 and 4 -> 3 goes to A token 2
    assert sel.kept.tolist() == [3, 4, 5, 6] and sel.anchors.tolist() == [1]
    assert torch.allclose(sel.weights, onehot_mean(1, 2)[None])
    sel = select(3)  # r = 3: every A token; 4 and 6 both into 3, a plain mean of the three
    assert sel.kept.tolist() == [5] and sel.anchors.tolist() == [1, 3]
    assert torch.allclose(sel.weights, torch.stack([onehot_mean(1, 2), onehot_mean(3, 4, 6)]))


def test_a_layer_asked_for_more_than_half_repeats_the_matching():
    # keep 2 of 6: round 1 merges all three A tokens (as above), leaving 0 (CLS), 1, 3, 5; round 2 alternates that
    # sequence: A = {3} (0 is the CLS), B = {1, 5}; 3's key is now the mean of 3, 4, 6: (-.3, 1), closer to 5
    sel = select(2)
    assert sel.kept.tolist() == [] and sel.anchors.tolist() == [1, 5]
    expected_5 = 0.5 * onehot_mean(5) + 0.5 * onehot_mean(3, 4, 6)
    assert torch.allclose(sel.weights, torch.stack([onehot_mean(1, 2), expected_5]))


def test_the_cls_token_holds_its_place_but_is_never_merged():
    # with token 0 valid, it is an A token too; its key (9, 9) is closest to 5 (1, 1): the strongest edge
    sel = select(6, signals(cls=False))
    assert sel.kept.tolist() == [1, 2, 3, 4, 6] and sel.anchors.tolist() == [5]
    for k in range(1, 6):
        sel = select(k)
        assert 0 not in sel.slots.tolist() and not sel.weights[:, 0].any()
        assert len(sel.slots) == k and torch.allclose(sel.weights.sum(dim=1), torch.ones(sel.num_merged))


def test_schedule_spreads_the_reduction_front_loaded():
    # 576 patches to ceil(0.25 · 576) = 144 over 23 layers: 432 to remove, 19 a layer then 18
    counts = schedule(576, 0.25, 23)
    assert counts[-1] == 144 and len(counts) == 23
    steps = [a - b for a, b in zip([576, *counts], counts)]
    assert steps == [19] * 18 + [18] * 5 and sum(steps) == 432
    assert schedule(16, 0.3, 2) == [10, 5] and schedule(16, 1.0, 2) == [16, 16]


@pytest.mark.parametrize("k", [1, 3])
def test_batched_equals_per_crop(k):
    other = [[9.0, 9.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.2, 1.0], [1.0, 0.3], [-1.0, -1.0]]
    both = TOME.selections(Signals(valid=torch.tensor([[False] + [True] * 6] * 2),
                                   vision_keys=torch.tensor([KEYS, other])), 1.0, torch.tensor([k, k]))
    for sel, keys in zip(both, (KEYS, other)):
        alone = select(k, signals(keys))
        assert sel.kept.tolist() == alone.kept.tolist() and sel.anchors.tolist() == alone.anchors.tolist()
        assert torch.equal(sel.weights, alone.weights)
