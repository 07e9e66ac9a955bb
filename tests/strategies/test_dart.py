"""dart on hand-made hidden states: pivots by norm, the least-similar rule, text pivots, exact indices by hand."""

import pytest
import torch

import vtprune.strategies.dart  # noqa: F401
from vtprune.errors import ConfigError
from vtprune.strategies import STRATEGIES, Signals, budget

DART = STRATEGIES.get("dart")
ONE_PIVOT = {"pivot_image_token": 1, "pivot_text_token": 0}


def signals(image, text=None, text_valid=None, valid=None):
    image = torch.tensor(image)
    image = image[None] if image.dim() == 2 else image
    valid = torch.ones(image.shape[:2], dtype=torch.bool) if valid is None else torch.tensor(valid, dtype=torch.bool)
    if text is not None:
        text = torch.tensor(text)
        text = text[None] if text.dim() == 2 else text
        text_valid = torch.tensor(text_valid, dtype=torch.bool)
        text_valid = text_valid[None] if text_valid.dim() == 1 else text_valid
    return Signals(valid=valid, hidden_states=image, text_hidden_states=text, text_valid=text_valid)


def kept(s, ratio, **options):
    return [k.tolist() for k in DART.select(s, ratio, **options)]


# L1 norms 1, 4, 3, 1, 1, 1; L2 norms 1, 2.83, 3, 1, 1, 0.71: the pivot is 1 under L1, 2 under L2.
NORMS = [[1.0, 0.0], [2.0, 2.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]


def test_dart_is_declared_in_llm_at_layer_2_with_its_authors_defaults():
    assert (DART.stage, DART.placement) == ("in_llm", {"layer": 2})
    assert DART.needs == ("hidden_states", "text_hidden_states")
    assert {name: opt.default for name, opt in DART.options.items()} == {
        "pivot_image_token": 4, "pivot_text_token": 4, "norm": "l1"}


def test_l1_pivot_then_least_similar_over_a_budget_sweep():
    # pivot 1 points at 45 degrees; cosines to it: 0 -> .71, 2 -> .71, 3 -> .71, 4 -> -.71, 5 -> 1.
    # Ascending: 4, then the tie 0 / 2 / 3 in index order, then 5 (the pivot's duplicate) last.
    s = signals(NORMS)
    expected = [[1], [1, 4], [0, 1, 4], [0, 1, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert [kept(s, k / 6, **ONE_PIVOT)[0] for k in range(1, 7)] == expected


def test_l2_pivot_then_least_similar():
    # pivot 2 points at 0 degrees; cosines: 0 -> 1, 1 -> .71, 3 -> 0, 4 -> -1, 5 -> .71.
    # Ascending: 4, 3, then the tie 1 / 5 in index order, then 0.
    s = signals(NORMS)
    expected = [[2], [2, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert [kept(s, k / 6, **ONE_PIVOT, norm="l2")[0] for k in range(1, 7)] == expected


# L1 norms 4, 6, 1, 1, 2, 1, 1: pivots 1 (45 degrees, first: larger norm) and 0 (0 degrees).
#            cos to pivot 1   cos to pivot 0
# 2 (-1, 0)      -.71            -1
# 3 (0, -1)      -.71             0
# 4 (-1, -1)     -1              -.71
# 5 (0, 1)        .71             0
# 6 (1, 0)        .71             1
TWO_PIVOTS = [[4.0, 0.0], [3.0, 3.0], [-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0], [0.0, 1.0], [1.0, 0.0]]


def test_two_pivots_share_the_rest_and_take_turns():
    # budget 1: the largest norm only. 2: both pivots. 3: one left, pivot 1 takes 4.
    # 4: one each: pivot 1 takes 4, pivot 0 takes 2. 5: quotas 2, 1: pivot 1 takes 4 and 2 (tie with 3, lower
    # index); pivot 0 would take 2 again but 2 is gone: it takes 3 (tie with 5 at 0, lower index).
    # 6: quotas 2, 2: pivot 0 takes 3 and 5.
    s = signals(TWO_PIVOTS)
    expected = [[1], [0, 1], [0, 1, 4], [0, 1, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], list(range(7))]
    assert [kept(s, k / 7, pivot_image_token=2, pivot_text_token=0)[0] for k in range(1, 8)] == expected


# Image pivot: 0 (L1 2, tied with 4, lower index). Text: t0 (0, .5), t1 (0, 3) the text pivot at 90 degrees,
# t2 (-5, -5) the largest but padding.
#            cos to 0 (0 deg)   cos to t1 (90 deg)   cos to t2 (225 deg)
# 1 (-1, 0)      -1                 0                   .71
# 2 (0, 1)        0                 1                  -.71
# 3 (0, -1)       0                -1                   .71
# 4 (1, 1)        .71               .71                -1
# 5 (1, 0)        1                 0                  -.71
TEXT_IMAGE = [[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0], [1.0, 0.0]]
TEXT = [[0.0, 0.5], [0.0, 3.0], [-5.0, -5.0]]


def test_text_pivot_steers_the_choice_and_is_not_kept():
    # budget 3, quotas 1, 1: pivot 0 takes 1, text pivot t1 takes 3
    s = signals(TEXT_IMAGE, TEXT, [1, 1, 0])
    assert kept(s, 0.5, pivot_image_token=1, pivot_text_token=1) == [[0, 1, 3]]
    # without it, pivot 0 takes 1 then 2 (tied with 3 at 0, lower index)
    assert kept(s, 0.5, pivot_image_token=1, pivot_text_token=0) == [[0, 1, 2]]
    # were t2 valid it would be the text pivot and take 4
    assert kept(signals(TEXT_IMAGE, TEXT, [1, 1, 1]), 0.5, pivot_image_token=1, pivot_text_token=1) == [[0, 1, 4]]


def test_no_valid_text_means_image_pivots_only():
    s = signals(TEXT_IMAGE, TEXT, [0, 0, 0])
    assert kept(s, 0.5, pivot_image_token=1, pivot_text_token=1) == [[0, 1, 2]]
    assert kept(signals(TEXT_IMAGE), 0.5, pivot_image_token=1, pivot_text_token=1) == [[0, 1, 2]]


def test_batch_never_keeps_padding_and_matches_each_sample_alone():
    # sample 0: TWO_PIVOTS then one padding token; sample 1: two padding tokens then NORMS. The padding has the
    # largest norms and points away from every pivot: as a candidate it would be the first one taken.
    pad = [-100.0, -100.0]
    image = [TWO_PIVOTS + [pad], [[100.0, 0.0], pad] + NORMS]
    valid = [[1] * 7 + [0], [0, 0] + [1] * 6]
    text = [[[0.0, 1.0], pad], [[1.0, 0.0], pad]]
    text_valid = [[1, 0], [1, 0]]
    # budgets ceil(3.5) = 4 and 3; sample 0: pivot 1 takes 4, then 2 and 3 (tied at -.71);
    # sample 1: NORMS' [0, 1, 4] shifted by 2
    assert kept(signals(image, text, text_valid, valid), 0.5, **ONE_PIVOT) == [[1, 2, 3, 4], [2, 3, 6]]
    assert kept(signals(TWO_PIVOTS), 0.5, **ONE_PIVOT) == [[1, 2, 3, 4]]
    # defaults (4 image, 4 text pivots): the batch gives each sample's own result
    batch = kept(signals(image, text, text_valid, valid), 0.7)
    alone = [kept(signals(TWO_PIVOTS, [text[0][:1]], [1]), 0.7)[0],
             [i + 2 for i in kept(signals(NORMS, [text[1][:1]], [1]), 0.7)[0]]]
    assert batch == alone


def test_random_batches_keep_exactly_the_budget_and_match_each_sample():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 3, generator=g)
    text = torch.randn(3, 5, 3, generator=g)
    lengths, text_lengths = [10, 7, 3], [5, 0, 2]
    valid = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    text_valid = torch.arange(5)[None] < torch.tensor(text_lengths)[:, None]
    s = Signals(valid=valid, hidden_states=hidden, text_hidden_states=text, text_valid=text_valid)
    for ratio in (0.05, 0.1, 0.2, 0.3, 0.45, 0.5, 0.7, 0.9, 1.0):
        for norm in ("l1", "l2"):
            batch = DART.select(s, ratio, norm=norm)
            for b, (n, t) in enumerate(zip(lengths, text_lengths)):
                k = batch[b].tolist()
                assert len(k) == len(set(k)) == budget(n, ratio)
                assert all(valid[b, i] for i in k)
                one = Signals(valid=valid[b : b + 1, :n], hidden_states=hidden[b : b + 1, :n],
                              text_hidden_states=text[b : b + 1, :t], text_valid=text_valid[b : b + 1, :t])
                assert DART.select(one, ratio, norm=norm)[0].tolist() == k


def test_options_are_checked_by_the_config():
    from vtprune.config import config_from_dict

    def config(options):
        return config_from_dict({"name": "t", "model": {"path": "tiny:llava"},
                                 "pruning": {"strategy": "dart", "options": options}})

    config({"pivot_image_token": 8, "pivot_text_token": 0, "norm": "l2"})
    with pytest.raises(ConfigError, match="pivot_image_token"):
        config({"pivot_image_token": 0})
    with pytest.raises(ConfigError, match="pivot_text_token"):
        config({"pivot_text_token": 65})
    with pytest.raises(ConfigError, match="norm"):
        config({"norm": "linf"})
