"""divprune on hand-made features: greedy max-min cosine diversity, exact order worked out by hand."""

import math

import torch

from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.divprune import max_min_diverse

DIVPRUNE = STRATEGIES.get("divprune")


def at_angles(degrees, norms=None):
    norms = norms or [1.0] * len(degrees)
    return torch.tensor(
        [[r * math.cos(math.radians(d)), r * math.sin(math.radians(d))] for d, r in zip(degrees, norms)]
    )


# unit directions at 0, 10, 25, 90, 170 degrees; cosine distance grows with the angle between two tokens.
# Token 3 has norm 100: a Euclidean max-min would start there, cosine distance ignores norms.
ANGLES = [0, 10, 25, 90, 170]
NORMS = [1.0, 5.0, 1.0, 100.0, 1.0]


def test_greedy_order_by_hand():
    # nearest-neighbour angles: 10, 10, 15, 65, 80 -> first pick 4 (the most isolated token).
    # Angle to {4}: 170, 160, 145, 80 -> 0.  Min angle to {4, 0}: 1 -> 10, 2 -> 25, 3 -> 80 -> 3.
    # Min angle to {4, 0, 3}: 1 -> 10, 2 -> 25 -> 2.  Then 1.
    assert max_min_diverse(at_angles(ANGLES, NORMS), 5).tolist() == [4, 0, 3, 2, 1]


def test_divprune_keeps_a_prefix_of_the_greedy_order():
    s = Signals(valid=torch.ones(1, 5, dtype=torch.bool), features=at_angles(ANGLES, NORMS)[None])
    assert [DIVPRUNE.select(s, r)[0].tolist() for r in (0.2, 0.4, 0.6, 0.8)] == [[4], [0, 4], [0, 3, 4], [0, 2, 3, 4]]


def test_ties_go_to_the_lower_index():
    # three orthogonal tokens: every distance is 1, so the order is 0, 1, 2
    assert max_min_diverse(torch.eye(3), 3).tolist() == [0, 1, 2]


def test_padding_is_never_kept():
    # sample 1 is sample 0 behind two padding tokens pointing at 260 degrees, the most isolated direction
    features = torch.stack([torch.cat([at_angles(ANGLES, NORMS), at_angles([0, 0])]), at_angles([260, 260] + ANGLES)])
    valid = torch.tensor([[1] * 5 + [0] * 2, [0] * 2 + [1] * 5], dtype=torch.bool)
    kept = DIVPRUNE.select(Signals(valid=valid, features=features), 0.6)
    assert [k.tolist() for k in kept] == [[0, 3, 4], [2, 5, 6]]


def test_divprune_keep_all_keeps_every_valid_token():
    features = torch.stack([at_angles(ANGLES + [0, 0]), at_angles([260, 260] + ANGLES)])
    valid = torch.tensor([[1] * 5 + [0] * 2, [0] * 2 + [1] * 5], dtype=torch.bool)
    kept = DIVPRUNE.select(Signals(valid=valid, features=features), 1.0)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]


def test_distance_is_exactly_symmetric():
    from vtprune.strategies.divprune import cosine_distance

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        d = cosine_distance(torch.randn(12, 7, generator=g))
        assert torch.equal(d, d.T)


def test_mutual_nearest_neighbours_tie_to_the_lower_index():
    # Tokens 0 and 1 are an isolated pair of mutual nearest neighbours (their nearest distances are one number),
    # tokens 2..5 a tight cluster: the most isolated token is 0 or 1, and the tie goes to 0 whatever the rounding.
    g = torch.Generator().manual_seed(1)
    checked = 0
    for _ in range(200):
        base = torch.randn(2, 6, generator=g)
        cluster = base[1] + 0.01 * torch.randn(4, 6, generator=g)
        pair = torch.stack([base[0], base[0] + 0.3 * torch.randn(6, generator=g)])
        features = torch.cat([pair, cluster])
        from vtprune.strategies.divprune import cosine_distance

        d = cosine_distance(features).fill_diagonal_(float("inf"))
        mutual = int(d[0].argmin()) == 1 and int(d[1].argmin()) == 0
        first = int(max_min_diverse(features, 1)[0])
        if mutual and first in (0, 1):
            checked += 1
            assert first == 0
    assert checked > 20
