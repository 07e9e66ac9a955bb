"""hired on hand-made CLS attention: the base view / crops split, the crops' shares from the base view's chunks,
top-k per partition, newline tokens, padding, batches, ties, options."""

import pytest
import torch

import vtprune.strategies.hired  # noqa: F401  (registers the strategy until it is listed in _MODULES)
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.base import budgets, topk_per_sample
from vtprune.strategies.hired import chunk_counts, weighted_split

HIRED = STRATEGIES.get("hired")

# base view 0..5 (group 0), crop A 6..8 (group 1), crop B 9..11 (group 2). Each crop's attention sums to 1, as a
# softmax per crop does, so the crops' own totals say nothing about where the budget should go.
GROUPS = [0] * 6 + [1] * 3 + [2] * 3
CLS = [0.05, 0.30, 0.10, 0.20, 0.25, 0.10] + [0.5, 0.3, 0.2] + [0.1, 0.6, 0.3]
NEWLINES = [3, 3]  # a group past the crops with CLS attention 0: tokens without a patch


def signals(groups, cls, valid=None):
    groups = torch.tensor(groups)
    valid = torch.ones(groups.shape, dtype=torch.bool) if valid is None else torch.tensor(valid, dtype=torch.bool)
    return Signals(valid=valid, groups=groups.masked_fill(~valid, -1), cls_attention=torch.tensor(cls))


def kept(s, budgets, **options):
    return [k.sort().values.tolist() for k in HIRED.fn(s, torch.tensor(budgets), **options)]


def test_the_crops_share_follows_the_base_views_chunks():
    # budget 6, alpha .5: base view floor(.5 · 6) = 3 -> its top 3: 1 (.30), 4 (.25), 3 (.20); crops 3.
    # The crops' shares: the base view's top floor(6 · .5) = 3 tokens (1, 4, 3) counted in 2 chunks of the
    # base view, positions 0..2 (crop A) and 3..5 (crop B): A 1 (token 1), B 2 (tokens 3, 4) -> A 3 · 1/3 = 1,
    # B 3 · 2/3 = 2. A's top 1: 6 (.5); B's top 2: 10 (.6), 11 (.3).
    s = signals([GROUPS], [CLS])
    assert chunk_counts(s.cls_attention[0, :6], 2, 0.5) == [1, 2]
    assert kept(s, [6]) == [[1, 3, 4, 6, 10, 11]]
    # the global top 6 by CLS attention (fastervlm) is another set: 10, 6, then .3 at 1, 7, 11, then 4
    top6 = topk_per_sample(s.cls_attention, s.valid, torch.tensor([6]))[0]
    assert top6.sort().values.tolist() == [1, 4, 6, 7, 10, 11]


def test_largest_remainder_and_caps():
    s = signals([GROUPS], [CLS])
    # budget 8: base 4 -> 1, 4, 3, then .10 ties at 2 and 5 -> 2. Crops 4: exact 4/3 and 8/3 -> floors 1, 2, the
    # last token to the larger remainder (B, 2/3) -> A 1 (6), B 3 (9, 10, 11). The authors' floors keep 7 tokens.
    assert kept(s, [8]) == [[1, 2, 3, 4, 6, 9, 10, 11]]
    # budget 10: base 5 -> all but 0; crops 5: B's exact 10/3 passes its 3 tokens -> B 3, A the other 2 (6, 7)
    assert kept(s, [10]) == [[1, 2, 3, 4, 5, 6, 7, 9, 10, 11]]
    assert weighted_split([1, 2], [3, 3], 4) == [1, 3]
    assert weighted_split([1, 2], [3, 3], 5) == [2, 3]
    assert weighted_split([0, 0], [1, 3], 2) == [1, 1]  # no weight: by size, 1/2 each, ties to the lower group


def test_alpha_sets_both_the_base_share_and_the_tokens_counted():
    s = signals([GROUPS], [CLS])
    # alpha .25, budget 6: base floor(1.5) = 1 -> 1. Crops 5, counted over the base view's top floor(4.5) = 4:
    # 1, 4, 3, 2 (the .10 tie to the lower index) -> A 2 (1, 2), B 2 (3, 4): 2.5 each, floors 2, 2, the equal
    # remainder to the lower crop -> A 3 (6, 7, 8), B 2 (10, 11).
    assert chunk_counts(s.cls_attention[0, :6], 2, 0.25) == [2, 2]
    assert kept(s, [6], alpha=0.25) == [[1, 6, 7, 8, 10, 11]]
    # alpha 1: the base view takes all it can (6 of 7); no base token counted -> the last one by crop size, ties
    # to crop A -> 6
    assert kept(s, [7], alpha=1.0) == [[0, 1, 2, 3, 4, 5, 6]]
    # alpha 0: nothing for the base view; every base token counted (3 per chunk) -> crops 3 and 3
    assert kept(s, [6], alpha=0.0) == [[6, 7, 8, 9, 10, 11]]


def test_newline_tokens_are_dropped_unless_nothing_else_is_left():
    # two newline tokens 12, 13: budget 7 -> base 3 (1, 4, 3), crops 4 -> A 1 (6), B 3 (9, 10, 11); no newline
    s = signals([GROUPS + NEWLINES], [CLS + [0.0, 0.0]])
    assert kept(s, [7]) == [[1, 3, 4, 6, 9, 10, 11]]
    # budget 13: every patch token (12), then the first newline
    assert kept(s, [13]) == [list(range(13))]
    assert [k.tolist() for k in HIRED.select(s, 1.0)] == [list(range(14))]


def test_a_single_view_is_top_k_by_cls_attention():
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 4, (2, 10), generator=g).float() / 4  # many ties
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    s = Signals(valid=valid, groups=torch.zeros(2, 10, dtype=torch.long).masked_fill(~valid, -1), cls_attention=cls)
    for ratio in (0.1, 0.3, 0.5, 0.7, 1.0):
        expected = [k.sort().values.tolist() for k in topk_per_sample(cls, valid, budgets(s.num_valid, ratio))]
        assert [k.tolist() for k in HIRED.select(s, ratio)] == expected


def test_budget_is_respected_over_a_sweep():
    s = signals([GROUPS + NEWLINES], [CLS + [0.0, 0.0]])
    for alpha in (0.0, 0.3, 0.5, 1.0):
        for budget in range(1, 15):
            out = HIRED.fn(s, torch.tensor([budget]), alpha=alpha)[0].tolist()
            assert len(out) == budget and len(set(out)) == budget


def test_padding_is_never_kept_and_batches_match_single_samples():
    # sample 0: the 3-group example + newlines; sample 1: a single view behind two padding tokens with the top
    # attention (groups -1 there, as the adapters pad)
    single = [0.2, 0.4, 0.1, 0.3, 0.0, 0.05, 0.3, 0.2, 0.1, 0.15, 0.25, 0.35]
    s = signals(
        [GROUPS + NEWLINES, [0] * 14], [CLS + [0.0, 0.0], [0.9, 0.9] + single], valid=[[1] * 14, [0] * 2 + [1] * 12]
    )
    alone = [signals([GROUPS + NEWLINES], [CLS + [0.0, 0.0]]), signals([[0] * 12], [single])]
    for ratio in (0.1, 0.25, 0.5, 0.75, 1.0):
        batch = [k.tolist() for k in HIRED.select(s, ratio)]
        assert batch[0] == HIRED.select(alone[0], ratio)[0].tolist()
        assert batch[1] == [i + 2 for i in HIRED.select(alone[1], ratio)[0].tolist()]
        assert 0 not in batch[1] and 1 not in batch[1]
    # budget ceil(.25 · 12) = 3 on the single view: 11 (.35), 1 (.40), then .3 at 3 and 6 -> 3 (+ 2 for padding)
    assert [k.tolist() for k in HIRED.select(s, 0.25)][1] == [3, 5, 13]


def test_ties_go_to_the_lower_index():
    # equal attention everywhere (newlines 0): budget 6 -> base 3: 0, 1, 2; the base view's top 3 are 0, 1, 2,
    # all in chunk A -> crop A 3: 6, 7, 8, crop B none
    s = signals([GROUPS + NEWLINES], [[0.1] * 12 + [0.0, 0.0]])
    assert kept(s, [6]) == [[0, 1, 2, 6, 7, 8]]


def test_options_are_checked():
    from vtprune.config import ConfigError, config_from_dict

    def config(options):
        return config_from_dict(
            {"name": "t", "model": {"path": "tiny:llava_next"}, "pruning": {"strategy": "hired", "options": options}}
        )

    assert config({"alpha": 0.25}).pruning.options == {"alpha": 0.25}
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match="alpha"):
            config({"alpha": bad})
    with pytest.raises(ValueError, match="alpha"):
        HIRED.select(signals([GROUPS], [CLS]), 0.5, alpha=2.0)
