"""hiprune on hand-made grids: anchors by the object layer, their grid neighbours, registers by the deep layer."""

import pytest
import torch

import vtprune.strategies.hiprune  # noqa: F401  (registers "hiprune" before the registry lists it)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.base import fraction_layer
from vtprune.strategies.hiprune import keep_hiprune

HIPRUNE = STRATEGIES.get("hiprune")

# A 4 × 4 crop, token 4·row + column:
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
#   12 13 14 15
LOW = 0.01


def scores(top: dict[int, float], n: int = 16) -> list[float]:
    return [top.get(i, LOW) for i in range(n)]


# Four vision layers: the default object layer is round(0.375 · 4 = 1.5) = 2 (half up), the deep layer is 4.
LAYERS = [
    scores({5: 0.9}),  # layer 1: would make 5 the anchor
    scores({7: 0.5, 13: 0.4, 0: 0.3}),  # layer 2, object: anchors 7, then 13, then 0
    scores({10: 0.9}),  # layer 3: would make 10 the anchor
    scores({6: 0.30, 0: 0.20, 15: 0.15, 5: 0.10}),  # layer 4, deep
]


def square(side: int, group: int = 0) -> list[tuple[int, int, int]]:
    return [(group, r, c) for r in range(side) for c in range(side)]


def signals(layers=LAYERS, cells=None):
    cells = cells or square(4)
    return Signals(
        valid=torch.ones(1, len(cells), dtype=torch.bool),
        vision_attention=torch.tensor([layers]),
        grid=torch.tensor([cells]),
    )


def test_object_layer_is_a_fraction_of_the_deep_layer():
    # LLaVA's CLIP-L: the projector reads layer 23 of 24, 0.375 · 23 = 8.625 -> 9, their layer; 9/24 of 24 is 9 too
    assert fraction_layer(0.375, 23) == 9 and fraction_layer(9 / 24, 24) == 9
    # their Qwen2.5-VL setting, 16 of 32; half up at 1.5; clamped into 1..L
    assert fraction_layer(0.5, 32) == 16 and fraction_layer(0.375, 4) == 2
    assert fraction_layer(0.375, 3) == 1 and fraction_layer(0.0, 4) == 1 and fraction_layer(1.0, 4) == 4


def test_anchors_buffers_registers_by_hand():
    # budget 10, alpha 1: round(10 · 1 / 5) = 2 anchors by layer 2: 7 and 13.
    # 7 (row 1, column 3) sits on the right edge: left 6, above 3, below 11, no right neighbour (the authors'
    # flat +1 would take 8, the next row's first token). 13 (row 3, column 1): left 12, right 14, above 9.
    # 8 tokens; 2 registers by layer 4 among the rest: 6 is taken already, so 0 (.20) and 15 (.15).
    kept = HIPRUNE.select(signals(), 10 / 16, alpha=1.0)[0].tolist()
    assert kept == [0, 3, 6, 7, 9, 11, 12, 13, 14, 15]
    assert 8 not in kept


def test_the_object_layer_option_picks_the_layer():
    # object_layer 1.0 -> layer 4 (the deep one): 1 anchor (budget 5, alpha 1) is 6: buffers 5, 7, 2, 10;
    # object_layer 0.75 -> layer 3: anchor 10, buffers 9, 11, 6, 14; 0.25 -> layer 1: anchor 5, buffers 4, 6, 1, 9
    assert HIPRUNE.select(signals(), 5 / 16, alpha=1.0, object_layer=1.0)[0].tolist() == [2, 5, 6, 7, 10]
    assert HIPRUNE.select(signals(), 5 / 16, alpha=1.0, object_layer=0.75)[0].tolist() == [6, 9, 10, 11, 14]
    assert HIPRUNE.select(signals(), 5 / 16, alpha=1.0, object_layer=0.25)[0].tolist() == [1, 4, 5, 6, 9]


def test_adjacent_anchors_share_buffers():
    # object layer with 7 and 6 on top: budget 10, alpha 1 -> anchors 7, 6; 7's neighbours 6 (an anchor), 3, 11;
    # 6's: 5, 7 (an anchor), 2, 10 -> 7 tokens; 3 registers by layer 4 among the rest: 0, 15, then all at .01 -> 1
    layers = [LAYERS[0], scores({7: 0.5, 6: 0.4}), LAYERS[2], LAYERS[3]]
    assert HIPRUNE.select(signals(layers), 10 / 16, alpha=1.0)[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 10, 11, 15]


def test_anchors_and_buffers_past_the_budget_are_cut():
    # budget 3, alpha 1: round(0.6) = 1 anchor, 7; its buffers in the order left, right, above, below: 6, 3, 11;
    # cut at 3: 7, 6, 3 and no register
    assert HIPRUNE.select(signals(), 3 / 16, alpha=1.0)[0].tolist() == [3, 6, 7]
    # budget 2: round(0.4) = 0 anchors, so the deep layer's top two, 6 and 0
    assert HIPRUNE.select(signals(), 2 / 16, alpha=1.0)[0].tolist() == [0, 6]
    # anchor 8 on the left edge (row 2, column 0): right 9, above 4, below 12; budget 3 keeps 8, 9, 4
    layers = [scores({8: 0.5}), LAYERS[3]]
    assert HIPRUNE.select(signals(layers), 3 / 16, alpha=1.0)[0].tolist() == [4, 8, 9]
    # budget 8: anchors 6, 13 (round(1.6) = 2); 6's buffers 5, 7, 2, 10; 2 slots left for 13's left 12, right 14,
    # above 9: 12 and 14, not 9
    layers = [scores({6: 0.5, 13: 0.4}), LAYERS[3]]
    assert HIPRUNE.select(signals(layers), 8 / 16, alpha=1.0)[0].tolist() == [2, 5, 6, 7, 10, 12, 13, 14]


def test_default_alpha_rounds_half_up():
    # 6 × 6 crop. Deep attention falls with the index (top 24 by it: 0..23); the object layer's top is 33
    # (row 5, column 3): left 32, right 34, above 27, no row below.
    deep = [(36 - i) / 100 for i in range(36)]
    obj = [LOW] * 36
    obj[33] = 0.5
    s = signals([obj, obj, obj, deep], square(6))
    # budget 24: 24 · 0.1 / 5 = 0.48 -> no anchor: the top 24 by deep attention
    assert HIPRUNE.select(s, 24 / 36)[0].tolist() == list(range(24))
    # budget 25: 0.5 -> 1 anchor (the authors' round, half to even, gives 0): 33, 32, 34, 27 + 21 registers 0..20
    assert HIPRUNE.select(s, 25 / 36)[0].tolist() == list(range(21)) + [27, 32, 33, 34]


def test_buffers_stay_in_their_crop_and_tokens_without_a_patch_are_only_registers():
    # two 2 × 2 crops, a newline (no patch) after each: 0 (0,0,0) 1 (0,0,1) 2 (0,1,0) 3 (0,1,1) 4 newline,
    # 5 (1,0,0) 6 (1,0,1) 7 (1,1,0) 8 (1,1,1) 9 newline.
    cells = square(2, 0) + [(-1, -1, -1)] + square(2, 1) + [(-1, -1, -1)]
    # the newline 4 has the highest object-layer score but is no anchor: 3 is; 3's neighbours are 2 (left) and
    # 1 (above), not 4 or 5 (the next flat indices); the newline 9 tops the deep layer and is a register.
    obj = [LOW, LOW, LOW, 0.5, 0.9, LOW, LOW, LOW, LOW, 0.0]
    deep = [LOW, LOW, LOW, LOW, 0.0, LOW, LOW, LOW, LOW, 0.9]
    s = signals([obj, deep], cells)  # 2 layers: object layer round(0.75) = 1
    # budget 4, alpha 1: 1 anchor (round(0.8)): 3, 2, 1; 1 register: 9
    assert HIPRUNE.select(s, 4 / 10, alpha=1.0)[0].tolist() == [1, 2, 3, 9]


def test_ties_go_to_the_lower_index():
    # 5 and 10 tie on the object layer: 5 is the anchor (buffers 4, 6, 1, 9); every deep score ties, so the 3
    # registers are the lowest free indices 0, 2, 3. Budget 8, alpha 0.5: round(0.8) = 1 anchor.
    layers = [scores({5: 0.5, 10: 0.5}), [0.1] * 16]
    assert HIPRUNE.select(signals(layers), 8 / 16, alpha=0.5)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 9]


def test_budget_one_and_budget_of_every_token():
    # budget 1: round(0.2) = 0 anchors even at alpha 1: the deep layer's top token, 6
    assert HIPRUNE.select(signals(), 1 / 16, alpha=1.0)[0].tolist() == [6]
    assert HIPRUNE.select(signals(), 0.01)[0].tolist() == [6]
    for alpha in (0.0, 0.1, 1.0):
        assert HIPRUNE.select(signals(), 1.0, alpha=alpha)[0].tolist() == list(range(16))


def test_alpha_zero_is_the_deep_layer_alone():
    # budget 3: the top 3 by layer 4: 6, 0, 15
    assert HIPRUNE.select(signals(), 3 / 16, alpha=0.0)[0].tolist() == [0, 6, 15]


def test_padding_never_kept_and_batched_equals_per_sample():
    # sample 1: a 3 × 3 crop (9 tokens) padded to 16. Its padding has the top scores on every layer and cells
    # right next to the crop, so only the valid mask keeps it out of anchors, buffers and registers.
    small = square(3)
    pad_cells = [(0, r, 3) for r in range(3)] + [(0, 3, c) for c in range(4)]
    small_layers = [scores({8: 0.5, 2: 0.3}, 9), scores({6: 0.4, 0: 0.3, 4: 0.2}, 9)]
    first = [LAYERS[1], LAYERS[3]]
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 9:] = False
    s = Signals(
        valid=valid,
        vision_attention=torch.tensor([first, [row + [9.0] * 7 for row in small_layers]]),
        grid=torch.tensor([square(4), small + pad_cells]),
    )
    for alpha in (0.1, 0.5, 1.0):
        for ratio in (0.1, 0.3, 0.5, 0.8, 1.0):
            both = HIPRUNE.select(s, ratio, alpha=alpha)
            alone = [HIPRUNE.select(signals(first), ratio, alpha=alpha)[0],
                     HIPRUNE.select(signals(small_layers, small), ratio, alpha=alpha)[0]]
            assert [x.tolist() for x in both] == [x.tolist() for x in alone]
            assert max(both[1].tolist()) < 9 and len(both[1]) == budget(9, ratio)
    # by hand, budget 5 of 9 (ratio 0.5), alpha 1: 1 anchor, the corner 8: buffers 7 (left) and 5 (above), its
    # right and lower cells are padding (11, 14); 2 registers by the deep layer: 6, 0
    assert HIPRUNE.select(s, 0.5, alpha=1.0)[1].tolist() == [0, 5, 6, 7, 8]


def test_budget_met_exactly_over_random_inputs():
    gen = torch.Generator().manual_seed(0)
    cells = square(5) + [(-1, -1, -1)] * 3
    s = signals(torch.rand(3, 28, generator=gen).tolist(), cells)
    for alpha in (0.0, 0.3, 1.0):
        for k in range(1, 29):
            kept = HIPRUNE.select(s, k / 28, alpha=alpha)[0].tolist()
            assert len(set(kept)) == len(kept) == budget(28, k / 28) == k


def test_out_of_range_options_are_refused():
    s = signals()
    budgets = torch.tensor([4])
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"object_layer": 1.2}, {"object_layer": -0.5}):
        with pytest.raises(ValueError, match="hiprune"):
            keep_hiprune(s, budgets, **bad)


def test_option_bounds_are_enforced_by_the_config():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "hiprune", "options": options}}
        )

    assert load({"alpha": 0.25, "object_layer": 0.5}).pruning.options == {"alpha": 0.25, "object_layer": 0.5}
    for key in ("alpha", "object_layer"):
        for bad in (1.5, -0.1):
            with pytest.raises(ConfigError, match=key):
                load({key: bad})
