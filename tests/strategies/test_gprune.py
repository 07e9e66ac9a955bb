"""gprune on hand-made tokens: information flow over a thresholded cosine graph, divided by each token's degree."""

import math

import pytest
import torch
import torch.nn.functional as F

import vtprune.strategies.gprune  # noqa: F401  (registers "gprune" before the registry lists it)
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget
from vtprune.strategies.gprune import flow_scores

GPRUNE = STRATEGIES.get("gprune")

# Three cliques of identical directions (cosine 1 inside, 0 across: no edge across at any threshold). Inside a
# clique every row is uniform over the clique whatever the temperature, and P·P = P, so for every t >= 1 a token
# receives its clique's mean norm and is divided by the clique's size:
#   A = {0, 1}, norms 1, 3: 2 / 2 = 1.0;  B = {2}, norm 1.5: 1.5;  C = {3, 4, 5, 6}, norms 5, 3, 3, 1: 3 / 4 = 0.75
# Order: 2, then 0 and 1 (tie -> 0 first), then 3, 4, 5, 6 (tie). Every number is exact in binary.
CLIQUES = [[1, 0, 0], [3, 0, 0], [0, 1.5, 0], [0, 0, 5], [0, 0, 3], [0, 0, 3], [0, 0, 1]]

# A chain a - b - c at 0, 45 and 90 degrees: cos(a, b) = cos(b, c) = 0.707 >= 0.5, cos(a, c) = 0 (no edge).
# Degrees (self included) 2, 3, 2. Norms w = 1, 2·sqrt(2) = 2.828, 1.75.
CHAIN = [[1, 0], [2, 2], [0, 1.75]]
# At this temperature a 45-degree link weighs exp((0.707 - 1) / T) = 1/2 of the self-link, so the rows of P are
# a: [2/3, 1/3, 0], b: [1/4, 1/2, 1/4], c: [0, 1/3, 2/3].
HALF = (1 - 2**-0.5) / math.log(2)


def signals(features):
    return Signals(valid=torch.ones(1, len(features), dtype=torch.bool), features=torch.tensor([features]))


def keep(features, ratio, **options):
    return GPRUNE.select(signals(features), ratio, **options)[0].tolist()


def test_cliques_by_hand():
    assert flow_scores(torch.tensor(CLIQUES), 0.5, 0.03, 5).tolist() == [1.0, 1.0, 1.5, 0.75, 0.75, 0.75, 0.75]
    assert keep(CLIQUES, 1 / 7) == [2]
    assert keep(CLIQUES, 2 / 7) == [0, 2]  # 0 and 1 tie: the lower index
    assert keep(CLIQUES, 3 / 7) == [0, 1, 2]
    assert keep(CLIQUES, 4 / 7) == [0, 1, 2, 3]  # 3..6 tie
    # the largest norms (5, 3, 3, 3) would keep 1, 3, 4, 5: the four-token clique is redundant, one of it is enough
    assert keep(CLIQUES, 1.0) == list(range(7))


def test_no_iteration_is_norm_over_degree():
    # t = 0: P^0 = I, the score is w / deg: 0.5, 1.5, 1.5, 1.25, 0.75, 0.75, 0.25. Order 1, 2 (tie -> 1), 3, 4, 5, 0, 6
    scores = flow_scores(torch.tensor(CLIQUES), 0.5, 0.03, 0)
    assert scores.tolist() == [0.5, 1.5, 1.5, 1.25, 0.75, 0.75, 0.25]
    assert keep(CLIQUES, 2 / 7, iterations=0) == [1, 2]
    assert keep(CLIQUES, 4 / 7, iterations=0) == [1, 2, 3, 4]


def test_chain_flow_by_hand():
    f = torch.tensor(CHAIN)
    r2 = 2**0.5
    # t = 0: w / deg = 0.5, 0.943, 0.875 -> b first
    assert flow_scores(f, 0.5, HALF, 0).tolist() == pytest.approx([0.5, r2 / 1.5, 0.875], rel=1e-12)
    # t = 1: received wP = a: 2/3 + 2.828/4 = 1.374;  b: 1/3 + 2.828/2 + 1.75/3 = 2.331;  c: 2.828/4 + 1.75·2/3 = 1.874
    # divided by 2, 3, 2: 0.687, 0.777, 0.937 -> c first
    once = [(2 / 3 + r2 / 2) / 2, (1 / 3 + r2 + 1.75 / 3) / 3, (r2 / 2 + 3.5 / 3) / 2]
    assert flow_scores(f, 0.5, HALF, 1).tolist() == pytest.approx(once, rel=1e-12)
    # t = 2: received (wP)P = a: 1.374·2/3 + 2.331/4 = 1.4986;  b: 1.374/3 + 2.331/2 + 1.874/3 = 2.2480;
    # c: 2.331/4 + 1.874·2/3 = 1.8319; divided: 0.74928, 0.74932, 0.91595
    received = torch.tensor(once, dtype=torch.float64) * torch.tensor([2.0, 3.0, 2.0], dtype=torch.float64)
    a, b, c = received.tolist()
    twice = [(a * 2 / 3 + b / 4) / 2, (a / 3 + b / 2 + c / 3) / 3, (b / 4 + c * 2 / 3) / 2]
    assert flow_scores(f, 0.5, HALF, 2).tolist() == pytest.approx(twice, rel=1e-12)
    assert keep(CHAIN, 1 / 3, temperature=HALF, iterations=0) == [1]
    assert keep(CHAIN, 1 / 3, temperature=HALF, iterations=1) == [2]
    assert keep(CHAIN, 2 / 3, temperature=HALF, iterations=2) == [1, 2]
    # the flow tends to total norm · (row sum of exp weights, 1.5 : 2 : 1.5) / deg: 0.837, 0.744, 0.837, so with
    # more steps the hub b (most neighbours) falls behind a
    assert keep(CHAIN, 2 / 3, temperature=HALF, iterations=5) == [0, 2]
    assert keep(CHAIN, 2 / 3, temperature=HALF, iterations=64) == [0, 2]


def test_threshold_and_temperature():
    # threshold 0.8 > 0.707: no links, P = I, deg 1: the score is the norm at any t -> b (2.83), then c (1.75)
    assert flow_scores(torch.tensor(CHAIN), 0.8, HALF, 5).tolist() == pytest.approx([1.0, 2 * 2**0.5, 1.75])
    assert keep(CHAIN, 1 / 3, similarity=0.8, temperature=HALF, iterations=1) == [1]
    # temperature 0.01: a link weighs exp(-29.3) = 2e-13 of the self-link, so P ~ I but the degrees stay 2, 3, 2:
    # scores ~ w / deg = 0.5, 0.943, 0.875 -> b, where the temperature HALF gave c
    assert flow_scores(torch.tensor(CHAIN), 0.5, 0.01, 1).tolist() == pytest.approx([0.5, 2**0.5 / 1.5, 0.875])
    assert keep(CHAIN, 1 / 3, temperature=0.01, iterations=1) == [1]
    # an edge at the threshold counts: lowered to the chain's exact 45-degree cosine, it links as at 0.5
    cos45 = float(F.normalize(torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=torch.float64), dim=-1).prod(0).sum())
    assert flow_scores(torch.tensor(CHAIN), cos45, HALF, 1).tolist() == flow_scores(torch.tensor(CHAIN), 0.5, HALF, 1).tolist()


def test_zero_vector_and_self_links():
    # a zero vector has no edge (cosine 0 with everything, and 0 is not > 0 even at threshold 0): it receives nothing
    # and scores 0; [1, 0] and [0, 1] are orthogonal, unlinked even at threshold 0, each keeping its norm 1
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    for t in (0, 1, 5):
        assert flow_scores(f, 0.0, 0.03, t).tolist() == [0.0, 1.0, 1.0]
    assert keep(f.tolist(), 1 / 3) == [1]
    assert keep(f.tolist(), 1.0) == [0, 1, 2]
    # rounded cosines of tokens with themselves fall a bit below 1 for some of these: at threshold 1 only the
    # explicit self-link keeps their rows distributions (no NaN); no two are parallel, so each keeps its own norm
    v = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = F.normalize(v, dim=-1)
    assert ((unit @ unit.T).diagonal() < 1).any()
    assert flow_scores(v, 1.0, 0.03, 5).tolist() == v.norm(dim=-1).tolist()


def test_padding_never_kept_and_batched_equals_per_sample():
    # sample 1: the chain in 3-D plus 4 padding tokens that would join its tokens' directions with large norms
    chain3 = [x + [0.0] for x in CHAIN]
    padding = [[9.0, 0.0, 0.0], [9.0, 9.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]]
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 3:] = False
    s = Signals(valid=valid, features=torch.tensor([CLIQUES, chain3 + padding]))
    for ratio in (0.1, 0.34, 0.5, 0.7, 1.0):
        for options in ({}, {"temperature": HALF, "iterations": 1}):
            both = GPRUNE.select(s, ratio, **options)
            alone = [keep(CLIQUES, ratio, **options), keep(chain3, ratio, **options)]
            assert [x.tolist() for x in both] == alone
            assert max(both[1].tolist()) < 3 and len(both[1]) == budget(3, ratio)
            assert len(both[0]) == budget(7, ratio)


def test_budget_respected_and_no_merges():
    gen = torch.Generator().manual_seed(0)
    n = 12
    s = Signals(valid=torch.ones(1, n, dtype=torch.bool), features=torch.randn(1, n, 4, generator=gen) + 1.5)
    for k in range(1, n + 1):
        selection = GPRUNE.selections(s, k / n)[0]
        assert len(set(selection.kept.tolist())) == len(selection.kept) == budget(n, k / n) == k
        assert selection.num_merged == 0
    assert not GPRUNE.merges and GPRUNE.needs == ("features",)


def test_option_bounds():
    from vtprune.config import config_from_dict

    def load(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava"}, "pruning": {"strategy": "gprune", "options": options}}
        )

    good = {"similarity": 0.7, "temperature": 0.1, "iterations": 3}
    assert load(good).pruning.options == good
    for key, bad in (("similarity", 1.5), ("similarity", -0.1), ("temperature", 0.0), ("temperature", 11.0),
                     ("iterations", -1), ("iterations", 65), ("iterations", 2.5)):
        with pytest.raises(ConfigError, match=key):
            load({key: bad})
    with pytest.raises(ValueError, match="temperature"):
        GPRUNE.select(signals(CHAIN), 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="similarity"):
        GPRUNE.select(signals(CHAIN), 0.5, similarity=2.0)
    with pytest.raises(ValueError, match="iterations"):
        GPRUNE.select(signals(CHAIN), 0.5, iterations=-1)
