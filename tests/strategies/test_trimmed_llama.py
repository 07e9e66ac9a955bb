"""trimmed_llama on hand-made head scores: per-head top-k union (adaptive) and round-robin capped union (budget)."""

import math

import pytest
import torch

from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals

TRIM = STRATEGIES.get("trimmed_llama")

# 2 heads over 6 tokens. Head 0 ranks 5, 1, 3, 0, 2, 4; head 1 ranks 5, 2, 4, 1, 0, 3.
SCORES = torch.tensor(
    [
        [0.30, 0.80, 0.10, 0.50, 0.05, 0.90],
        [0.20, 0.40, 0.85, 0.10, 0.60, 0.95],
    ]
)


def signals(scores, valid=None):
    scores = scores[None] if scores.dim() == 2 else scores
    valid = torch.ones(scores.shape[0], scores.shape[2], dtype=torch.bool) if valid is None else valid
    return Signals(valid=valid, cross_attention=scores)


def kept(keep, mode="adaptive", scores=SCORES, valid=None):
    return [k.tolist() for k in TRIM.select(signals(scores, valid), keep, mode=mode)]


def test_adaptive_is_union_of_per_head_topk():
    # k = ceil(0.5 · 6) = 3: head 0 → {5, 1, 3}, head 1 → {5, 2, 4}
    assert kept(0.5) == [[1, 2, 3, 4, 5]]
    # k = 1: both heads pick 5 → the union can be as small as k
    assert kept(1 / 6) == [[5]]
    # k = 2: {5, 1} ∪ {5, 2}
    assert kept(2 / 6) == [[1, 2, 5]]


def test_budget_takes_ranked_lists_round_robin_skipping_duplicates():
    # order read: h0 r0 = 5, h1 r0 = 5 (dup), h0 r1 = 1, h1 r1 = 2, h0 r2 = 3, h1 r2 = 4, ...
    assert kept(1 / 6, "budget") == [[5]]
    assert kept(2 / 6, "budget") == [[1, 5]]
    assert kept(3 / 6, "budget") == [[1, 2, 5]]
    assert kept(4 / 6, "budget") == [[1, 2, 3, 5]]
    assert kept(1.0, "budget") == [[0, 1, 2, 3, 4, 5]]


def test_budget_round_robin_starts_with_head_zero():
    # Both heads rank different tokens first: with budget 1 head 0's best wins, with 3 head 0 gets the extra slot.
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.8, 0.9]])
    assert kept(1 / 4, "budget", scores) == [[0]]
    assert kept(2 / 4, "budget", scores) == [[0, 3]]
    assert kept(3 / 4, "budget", scores) == [[0, 1, 3]]


def test_budget_is_exact_and_adaptive_at_least_budget():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 40, generator=gen)
    for keep in (0.1, 0.25, 0.5, 0.9):
        k = math.ceil(keep * 40)
        assert all(len(x) == k for x in kept(keep, "budget", scores))
        assert all(k <= len(x) <= min(40, 4 * k) for x in kept(keep, "adaptive", scores))


def test_padding_never_kept_and_budget_from_valid_count():
    scores = torch.stack([SCORES, SCORES])
    # sample 1: tokens 4, 5 are padding (a padded tile) even though they score highest
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    adaptive = kept(0.5, "adaptive", scores, valid)
    # sample 1: k = ceil(0.5 · 4) = 2: head 0 ranks 1, 3, 0, 2; head 1 ranks 2, 1, 0, 3
    assert adaptive == [[1, 2, 3, 4, 5], [1, 2, 3]]
    budget = kept(0.5, "budget", scores, valid)
    assert budget == [[1, 2, 5], [1, 2]]
    assert kept(1.0, "adaptive", scores, valid)[1] == [0, 1, 2, 3]


def test_outputs_are_sorted_long_tensors():
    out = TRIM.select(signals(SCORES), 0.5, mode="budget")
    assert out[0].dtype == torch.long
    assert out[0].tolist() == sorted(out[0].tolist())


def test_declared_options_are_validated():
    from vtprune.config import config_from_dict

    base = {"name": "t", "model": {"path": "tiny:mllama"}}
    ok = config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "keep_ratio": 0.5, "options": {"mode": "budget"}}})
    assert ok.pruning.options == {"mode": "budget"}
    with pytest.raises(ConfigError, match="mode"):
        config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "options": {"mode": "greedy"}}})
    with pytest.raises(ConfigError, match="layer"):
        config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "options": {"layer": 2}}})
    # where it prunes is the placement's: the first layer's cache cut is a placement setting of cross-attention models
    cut = config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "placement": {"prune_first_layer_cache": False}}})
    assert cut.pruning.placement == {"prune_first_layer_cache": False}
    with pytest.raises(ConfigError, match=r"pruning.options.prune_first_layer_cache: .*pruning.placement.prune_first_layer_cache"):
        config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "options": {"prune_first_layer_cache": False}}})
    with pytest.raises(ConfigError, match=r"pruning.placement.layer: not a setting of 'trimmed_llama', which prunes at the "
                                          r"cross-attention layers \(allowed: prune_first_layer_cache, prune_first_layer\)"):
        config_from_dict({**base, "pruning": {"strategy": "trimmed_llama", "placement": {"layer": 2}}})
    assert TRIM.stage == "in_llm" and TRIM.needs == ("cross_attention",)
