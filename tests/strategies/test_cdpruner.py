"""cdpruner on hand-made features and text: relevance, the conditional DPP's greedy order checked by hand and by
brute force, diversity against relevance, padding, batches, ties, options."""

import itertools
import math

import pytest
import torch

import vtprune.strategies.cdpruner  # noqa: F401  (registers the strategy until it is listed in _MODULES)
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.cdpruner import greedy_map, relevance

CDPRUNER = STRATEGIES.get("cdpruner")


def signals(features, text, valid=None, text_valid=None):
    """One sample per entry of ``features`` (lists of vectors); each sample's text tokens likewise."""
    features = torch.tensor(features, dtype=torch.float32)
    text = torch.tensor(text, dtype=torch.float32)
    valid = torch.ones(features.shape[:2], dtype=torch.bool) if valid is None else torch.tensor(valid, dtype=torch.bool)
    text_valid = None if text_valid is None else torch.tensor(text_valid, dtype=torch.bool)
    return Signals(valid=valid, features=features, text_embeds=text, text_valid=text_valid)


def kept(s, ratio, **options):
    return [k.tolist() for k in CDPRUNER.select(s, ratio, **options)]


# unit vectors; q_i and the cosines are exact decimals, so every gain below is worked out by hand
KERNEL_FEATURES = torch.tensor([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.6, 0.8], [0.6, 0, 0.8]], dtype=torch.float64)
KERNEL_Q = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.8], dtype=torch.float64)


def kernel():
    return KERNEL_Q[:, None] * (KERNEL_FEATURES @ KERNEL_FEATURES.T) * KERNEL_Q[None, :]


def test_greedy_order_by_hand():
    # cosines: c01 .8, c04 .6, c13 .36, c14 .48, c12 .6, c23 .6, c34 .64, c02 = c03 = c24 = 0.
    # Step 1: gains q² = 1, .81, .49, .25, .64 -> 0.
    # Step 2: q_j² (1 - c0j²): 1: .81 · .36 = .2916; 2: .49; 3: .25; 4: .64 · .64 = .4096 -> 2 (4th by q).
    # Step 3: {0, 2} spans the xy-plane, a gain is q² · z²: 1: 0 (in the plane); 3: .25 · .64 = .16;
    #   4: .64 · .64 = .4096 -> 4.
    # Step 4: {0, 2, 4} spans R³, nothing adds volume: restart on {1, 3}: q² .81 vs .25 -> 1, then 3.
    assert greedy_map(kernel(), 5).tolist() == [0, 2, 4, 1, 3]


def test_greedy_picks_are_the_brute_force_log_det_maxima():
    # brute force over every subset of size k of det(L_S) (log det is monotone in det):
    #   k = 2: (0, 2) .49 > (0, 4) .4096 > (1, 4) .81 · .64 · (1 - .2304) = .399 > ...
    #   k = 3: (0, 2, 4) 1 · .49 · .64 · .8² = .2007 > (0, 1, 4) .5184 · .48² = .1194 > (1, 2, 4) .104 > ...
    # (at k = 4 every determinant is 0: the features span only R³)
    L = kernel()
    order = greedy_map(L, 3).tolist()
    for k in (1, 2, 3):
        best = max(itertools.combinations(range(5), k), key=lambda s: float(torch.linalg.det(L[list(s)][:, list(s)])))
        assert sorted(order[:k]) == list(best)
    assert order[:3] == [0, 2, 4]


def test_each_greedy_step_maximises_the_determinant():
    # on full-rank random kernels each greedy step adds the token maximising det(L_{S+j}) over the others
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(7, 7, generator=g, dtype=torch.float64)
        L = x @ x.T
        order = greedy_map(L, 7).tolist()
        for t in range(7):
            rest = [j for j in range(7) if j not in order[:t]]
            dets = [float(torch.linalg.det(L[order[:t] + [j]][:, order[:t] + [j]])) for j in rest]
            assert order[t] == rest[max(range(len(rest)), key=dets.__getitem__)]


def test_relevance_is_the_min_max_normalised_mean_cosine():
    # text e1, e2 (e3 padding). Mean cosines: token 0 (e1): .5; token 1 (e1 + e2, cos .707 each): .707;
    # token 2 (-e1): -.5; token 3 (e3): 0 (the padding text token would give it 1/3). min -.5, spread 1.207.
    s = signals(
        [[[2.0, 0, 0], [1, 1, 0], [-1, 0, 0], [0, 0, 1]]],
        [[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]],
        text_valid=[[True, True, False]],
    )
    q = relevance(s.features[0], s.text_embeds[0, :2])
    r = torch.tensor([0.5, math.sqrt(0.5), -0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(q, (r + 0.5 + 1e-6) / (math.sqrt(0.5) + 0.5), atol=1e-12)
    # no text, or all tokens equally relevant: q = 1 (pure diversity), no division by zero
    assert relevance(s.features[0], s.text_embeds[0, :0]).tolist() == [1.0] * 4
    assert relevance(torch.eye(3), torch.ones(1, 3)).tolist() == [1.0] * 3


# Text e1, so relevance r = the first coordinate; r: 1, .96, .8, 0, 5/13 -> q = r + 1e-6 (min 0, spread 1).
# Token 1 is almost token 0 (cos .96).
DIVERSE = [[1, 0, 0], [0.96, 0.28, 0], [0.8, 0, 0.6], [0, 0.6, 0.8], [5 / 13, 12 / 13, 0]]
TEXT_E1 = [[1.0, 0, 0]]


def test_diversity_beats_relevance():
    # Step 1: the most relevant token, 0. Step 2: gains q² (1 - r²) (cos with token 0 is r):
    #   1: .9216 · .0784 = .0723; 2: .64 · .36 = .2304; 3: ~0; 4: (5/13)² (12/13)² = .1260 -> 2, though 1 is more
    #   relevant. Step 3: {0, 2} spans the xz-plane, a gain is q² y²: 1: .9216 · .0784 = .0723;
    #   3: 1e-12 · .36; 4: .1479 · .8521 = .1260 -> 4, the 4th most relevant. Then {0, 2, 4} spans R³: restart
    #   on {1, 3}, q 0.96 vs 1e-6 -> 1, then 3. Top-k relevance would keep 0, 1, 2, 4, 3 in that order.
    s = signals([DIVERSE], [TEXT_E1])
    assert [kept(s, r / 5)[0] for r in range(1, 6)] == [[0], [0, 2], [0, 2, 4], [0, 1, 2, 4], [0, 1, 2, 3, 4]]


def test_relevance_beats_diversity():
    # 2-D, text e1: r = 1, .8, 0, -.6, -.8 -> q = (r + .8 + 1e-6) / 1.8 = 1, .889, .444, .111, ~0.
    # After 0, gains q² (1 - r²): 1: .790 · .36 = .284; 2: .198 · 1 = .198; 3: .0123 · .64 = .0079; 4: ~0
    # -> 1, close to 0 (cos .8) but relevant, beats the orthogonal 2. Pure diversity (quality exp, theta 0:
    # q = 1) takes 2 instead (gains 1 - r²: .36, 1, .64, .36).
    s = signals([[[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8], [-0.8, -0.6]]], [[[1.0, 0]]])
    assert kept(s, 0.4) == [[0, 1]]
    assert kept(s, 0.4, quality="exp", theta=0.0) == [[0, 2]]


def test_theta_moves_the_trade_off_towards_relevance():
    # exp quality, theta .99: alpha 49.5, q = exp(49.5 · (r + 1e-6)). Against token 0, q1 / q0 = e^-1.98 = .138
    # and q2 / q0 = e^-9.9 = 5e-5: after 0, gains ∝ .138² · .0784 = 1.5e-3 (token 1) vs 9e-10 (token 2) -> 1,
    # the top-2 by relevance. theta .5: alpha .5, q² = e^(r + 1e-6), so after 0 the gains are e^r (1 - r²):
    # 1: 2.61 · .0784 = .205; 2: 2.23 · .36 = .801; 3: 1 · 1 = 1; 4: 1.47 · .852 = 1.251 -> 4 (the linear
    # default, where the irrelevant 3 has q ~ 0, takes 2).
    s = signals([DIVERSE], [TEXT_E1])
    assert kept(s, 0.4, quality="exp", theta=0.99) == [[0, 1]]
    assert kept(s, 0.4, quality="exp", theta=0.5) == [[0, 4]]
    assert kept(s, 0.4) == [[0, 2]]


def test_padding_text_tokens_are_ignored():
    # a second text token e2 marked padding; counted, it would change every relevance
    s = signals([DIVERSE], [TEXT_E1 + [[0.0, 1, 0]]], text_valid=[[True, False]])
    assert [kept(s, r / 5)[0] for r in range(1, 4)] == [[0], [0, 2], [0, 2, 4]]
    s.text_valid[:] = True
    assert kept(s, 0.2) != [[0]]


def test_padding_is_never_kept_and_batches_match_single_samples():
    # sample 0: DIVERSE then two padding tokens on e2 / e3 (relevant after renormalisation and diverse);
    # sample 1: two padding tokens first, then the 2-D set of test_relevance_beats_diversity in 3-D.
    pads = [[0, 1, 0], [0, 0, 1]]
    two_d = [[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [-0.6, 0.8, 0], [-0.8, -0.6, 0]]
    s = signals([DIVERSE + pads, pads + two_d], [TEXT_E1, TEXT_E1], valid=[[1] * 5 + [0] * 2, [0] * 2 + [1] * 5])
    alone = [signals([DIVERSE], [TEXT_E1]), signals([two_d], [TEXT_E1])]
    for ratio in (0.2, 0.4, 0.6, 0.8, 1.0):
        batch = kept(s, ratio)
        assert batch[0] == kept(alone[0], ratio)[0]
        assert batch[1] == [i + 2 for i in kept(alone[1], ratio)[0]]
    assert kept(s, 0.4) == [[0, 2], [2, 3]]


def test_budget_is_respected_over_a_sweep():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 12, 3, generator=g)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    s = Signals(valid=valid, features=features, text_embeds=torch.randn(2, 4, 3, generator=g))
    for budget in range(1, 13):
        out = CDPRUNER.fn(s, torch.tensor([budget, min(budget, 9)]))
        for b, k in enumerate((budget, min(budget, 9))):
            assert len(out[b]) == k and len(set(out[b].tolist())) == k
            assert bool(valid[b, out[b]].all())


def test_ties_go_to_the_lower_index():
    # equal relevance (text (1, 1, 1) against e1, e2, e3) -> q = 1; e1, e2, e3 twice: the first three are
    # orthogonal (equal gains) -> 0, 1, 2; then they span R³ and the restart over 3, 4, 5 ties again -> 3, 4, 5
    s = signals([[[1, 0, 0], [0, 1, 0], [0, 0, 1]] * 2], [[[1.0, 1, 1]]])
    assert greedy_map(torch.eye(6, dtype=torch.float64), 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert [kept(s, r / 6)[0] for r in range(1, 7)] == [list(range(k)) for k in range(1, 7)]
    # mirror images: tokens 1 and 2 at ±36.87° from token 0 have equal relevance and gains -> 1 first.
    # q = (r + 1 + 1e-6) / 2 = 1, .9, .9, ~0, .98; after 0 gains q² (1 - r²): .2916, .2916, ~0, .9604 · .0784
    s = signals([[[1, 0], [0.8, 0.6], [0.8, -0.6], [-1, 0], [0.96, 0.28]]], [[[1.0, 0]]])
    assert CDPRUNER.fn(s, torch.tensor([2]))[0].tolist() == [0, 1]


def test_no_text_is_pure_diversity():
    s = signals([DIVERSE], [[[0.0, 0, 0]]], text_valid=[[False]])
    # q = 1: first pick 0 (tie -> lower index); after 0 gains 1 - r²: .0784, .36, 1, .852 -> 3
    assert kept(s, 0.4) == [[0, 3]]


def test_options_are_checked():
    from vtprune.config import ConfigError, config_from_dict

    def config(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava_next"}, "pruning": {"strategy": "cdpruner", "options": options}}
        )

    assert config({"quality": "exp", "theta": 0.7}).pruning.options == {"quality": "exp", "theta": 0.7}
    with pytest.raises(ConfigError, match="theta"):
        config({"theta": 1.0})
    with pytest.raises(ConfigError, match="quality"):
        config({"quality": "log"})
    with pytest.raises(ValueError, match="theta"):
        CDPRUNER.select(signals([DIVERSE], [TEXT_E1]), 0.4, theta=-0.1)
