"""fitprune on hand-made attention maps: the cross · self score, the authors' tables as counts, the depth mapping."""

from fractions import Fraction

import pytest
import torch

import vtprune.strategies.fitprune  # noqa: F401  (registers "fitprune" before the registry lists it)
from vtprune.placement import resolve_placement
from vtprune.strategies import STRATEGIES, Signals
from vtprune.strategies.fitprune import DELETE_SCHEMES, choose_table, depth, equivalent_fraction, schedule, scores

FITPRUNE = STRATEGIES.get("fitprune")

# Head-max attention of 4 visual rows to the 4 visual tokens (causal). Column sums 2, 1, 0.75, 0.25, over n = 4:
# self = [0.5, 0.25, 0.1875, 0.0625].
VISUAL = [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25, 0.25, 0.5, 0], [0.25, 0.25, 0.25, 0.25]]
# Two text rows, each [1, 2, 4, 8] / 16: cross = [0.125, 0.25, 0.5, 1]. cross · self = [1/16, 1/16, 3/32, 1/16]:
# token 2 first, then 0, 1, 3 tied (the lower index first). cross alone would rank 3 first, self alone 0 first.
TEXT = [[1 / 16, 2 / 16, 4 / 16, 8 / 16]] * 2
# a padded text row (text_valid False): counted, it would lift token 3 to 2 · 1/16 = 0.125 > 3/32
PAD_ROW = [0.0, 0.0, 0.0, 1.0]

# Sample two: 3 visual tokens, columns sums 1.5, 0.5, 1 over n = 3: self = [1/2, 1/6, 1/3]; one text row
# [0.25, 0.5, 0.25]: cross · self = [1/8, 1/12, 1/12]: token 0, then 1 and 2 tied (1 first).
VISUAL_B = [[1.0, 0, 0], [0.25, 0.25, 0], [0.25, 0.25, 1.0]]
TEXT_B = [[0.25, 0.5, 0.25]]


def signals(visual=VISUAL, text=TEXT, text_valid=None, stage=0, stages=1, num_visual=None):
    n = len(visual)
    return Signals(
        valid=torch.ones(1, n, dtype=torch.bool),
        visual_attention_max=torch.tensor([visual]),
        text_attention_max=torch.tensor([text]),
        text_valid=torch.tensor([text_valid if text_valid is not None else [True] * len(text)]),
        stage=stage,
        stages=stages,
        num_visual=torch.tensor([num_visual if num_visual is not None else n]),
    )


def kept(s, keep_ratio):
    return [k.tolist() for k in FITPRUNE.select(s, keep_ratio)]


def test_registration():
    assert FITPRUNE.needs == ("text_attention_max", "visual_attention_max")
    assert FITPRUNE.stage == "in_llm" and not FITPRUNE.merges
    assert FITPRUNE.placement == {"layers": "all"} and FITPRUNE.schedule is schedule
    assert FITPRUNE.kind == "in-LLM, multi-stage"
    assert FITPRUNE.options == {}
    # "all": a stage after every decoder layer but the last
    placement = resolve_placement(FITPRUNE, {}, cross_attention=False, decoder_layers=32)
    assert placement.layers == tuple(range(1, 32))


def test_score_is_cross_times_self_over_the_valid_text_rows():
    s = signals(text=[*TEXT, PAD_ROW], text_valid=[True, True, False])
    got = scores(s, 0, torch.arange(4))
    assert got.dtype == torch.float64
    assert got.tolist() == [1 / 16, 1 / 16, 3 / 32, 1 / 16]
    # the padded row counted (a different result, so text_valid is what excludes it)
    s.text_valid[:] = True
    assert scores(s, 0, torch.arange(4)).tolist() == [1 / 16, 1 / 16, 3 / 32, 1 / 8]


def test_counts_follow_the_table_and_the_score_picks():
    # 4 tokens, stages = 1 (L = 2): the stage reads the authors' layer round(32 / 2) - 1 = 15.
    # left after 15: 163 (70 %), 281 (50 %), 416 (30 %), 538 (10 %) of 576:
    # round(4 · ·/576) = 1, 2, 3, 4 (1.13, 1.95, 2.89, 3.74)
    s = signals(text=[*TEXT, PAD_ROW], text_valid=[True, True, False])
    assert kept(s, 0.3) == [[2]]
    assert kept(s, 0.52) == [[0, 2]]
    assert kept(s, 0.74) == [[0, 1, 2]]  # 0, 1, 3 tied: the lower two stay
    assert kept(s, 0.94) == [[0, 1, 2, 3]]
    # budgets are ignored: handed a budget of 4, the 70 % table's count (1) still decides
    s.keep_ratio = 0.3
    assert [k.tolist() for k in FITPRUNE.fn(s, torch.tensor([4]))] == [[2]]


def test_keep_all():
    assert kept(signals(), 1.0) == [[0, 1, 2, 3]]
    assert kept(signals(), 1.5) == [[0, 1, 2, 3]]
    assert schedule(576, 1.0, 31) == [576] * 31


def test_budget_one_and_a_count_above_what_is_present():
    # 90 % table, N = 4: every stage rounds to 0 and keeps 1 (the top score)
    assert schedule(4, 0.05, 3) == [1, 1, 1]
    assert kept(signals(stage=2, stages=3), 0.05) == [[2]]
    # a later stage whose count (from the original N = 8) exceeds the 4 tokens still present keeps them all:
    # 30 % table at depth 15: round(8 · 416 / 576) = round(5.78) = 6 > 4
    assert kept(signals(num_visual=8), 0.74) == [[0, 1, 2, 3]]


# the authors' tokens left after their layers 0..30 (576 minus the running sum of delete_scheme)
LEFT_50 = [573, 566, 517, 493, 464, 447, 388, 347, 321, 313, 303, 297, 295, 290, 283, 281, 251, 248, 235, 208, 203,
           180, 178, 177, 177, 177, 176, 175, 173, 173, 173]
LEFT_80 = [448, 321, 203, 168, 142, 134, 121, 118, 116, 115, 115, 115, 115, 113, 112, 104, 97, 89, 84, 73, 71, 65,
           64, 63, 63, 63, 63, 62, 62, 62, 62]


def test_schedule_reproduces_the_authors_counts_on_llava_1_5_7b():
    assert schedule(576, 0.52, 31) == LEFT_50
    assert schedule(576, 0.25, 31) == LEFT_80
    # the tables themselves: a few entries and totals as in the authors' file
    assert DELETE_SCHEMES[50][:3] == (3, 7, 49) and sum(DELETE_SCHEMES[50]) == 576 - 173
    assert DELETE_SCHEMES[90][0] == 262 and sum(DELETE_SCHEMES[90]) == 539
    assert sorted(DELETE_SCHEMES) == [0, 10, 20, 30, 40, 50, 55, 60, 70, 80, 90]
    assert all(len(t) == 32 and t[31] == 0 for t in DELETE_SCHEMES.values())


def test_equivalent_fraction():
    assert equivalent_fraction(0) == 1
    # 90 %: layer 0 sees 576, layers 1..31 what layers 0..30 left: 314 + 161 + 81 + 62 + 49 + 48 + 9 · 46 + 45 + 44
    # + 42 + 41 + 39 + 39 + 6 · 38 + 4 · 37 = 1755; (576 + 1755) / (32 · 576) = 2331 / 18432 = 259 / 2048
    assert equivalent_fraction(90) == Fraction(259, 2048)
    fractions = [equivalent_fraction(t) for t in sorted(DELETE_SCHEMES)]
    assert fractions == sorted(fractions, reverse=True)


def test_choice_of_table():
    # fractions: 50 % ≈ 0.52398, 55 % ≈ 0.47635, 70 % ≈ 0.32617, 80 % ≈ 0.22673, 10 % ≈ 0.93951, 20 % ≈ 0.85509
    assert choose_table(0.52) == 50
    assert choose_table(0.5) == 55  # 0.02365 from 55 %, 0.02398 from 50 %
    assert choose_table(0.25) == 80 and choose_table(0.3) == 70
    assert choose_table(0.9) == 10 and choose_table(0.99) == 0 and choose_table(0.05) == 90
    # exactly between 60 % (871/2048) and 70 % (167/512 = 668/2048): 1539/4096, a float; the tie keeps more
    assert choose_table(1539 / 4096) == 60
    assert choose_table(1539 / 4096 - 1e-12) == 70


def test_depth_mapping_on_other_models():
    assert [depth(s, 32) for s in range(31)] == list(range(31))
    # L = 4: K = 1, 2, 3 read the authors' layers round(8, 16, 24) - 1 = 7, 15, 23
    assert [depth(s, 4) for s in range(3)] == [7, 15, 23]
    # N = 16, 70 % table: left 195, 163, 90 -> 16 · / 576 = 5.42, 4.53, 2.5 -> 5, 5, 3 (half up)
    assert schedule(16, 0.3, 3) == [5, 5, 3]
    # L = 80: the first stage is above the authors' layer 0 (depth -1: nothing deleted yet); the last reads 31
    assert depth(0, 80) == -1 and depth(78, 80) == 31
    counts = schedule(576, 0.3, 79)
    assert counts[0] == 576 and counts[1] == 528 and counts[-1] == 88
    assert counts == sorted(counts, reverse=True)
    # L = 64: the first stage is at 32/64 = 0.5, rounded up to the authors' layer 1 - 1 = 0
    assert depth(0, 64) == 0
    # L = 3: round(32/3 = 10.67) - 1 = 10, round(64/3 = 21.33) - 1 = 20
    assert [depth(s, 3) for s in range(2)] == [10, 20]


def test_padded_batch_equals_each_alone():
    # sample 0: the 4-token map; sample 1: 3 tokens (a padded column and row of zeros) and 1 text row (left padded)
    visual = torch.zeros(2, 4, 4)
    visual[0] = torch.tensor(VISUAL)
    visual[1, :3, :3] = torch.tensor(VISUAL_B)
    text = torch.zeros(2, 2, 4)
    text[0] = torch.tensor(TEXT)
    text[1, 1, :3] = torch.tensor(TEXT_B[0])
    text[1, 0] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # a padded row on a padded column: never counted
    batch = Signals(
        valid=torch.tensor([[True] * 4, [True, True, True, False]]),
        visual_attention_max=visual,
        text_attention_max=text,
        text_valid=torch.tensor([[True, True], [False, True]]),
        stage=0,
        stages=1,
        num_visual=torch.tensor([4, 3]),
    )
    alone_b = signals(visual=VISUAL_B, text=TEXT_B)
    # 30 % table at depth 15: round(4 · 416/576) = 3, round(3 · 416/576) = round(2.17) = 2
    assert kept(batch, 0.74) == [[0, 1, 2], [0, 1]]
    assert kept(batch, 0.74) == kept(signals(), 0.74) + kept(alone_b, 0.74)
    # 50 % table: round(4 · 281/576) = 2, round(3 · 281/576) = round(1.46) = 1
    assert kept(batch, 0.52) == [[0, 2], [0]] == kept(signals(), 0.52) + kept(alone_b, 0.52)


def test_context_must_be_set():
    s = signals()
    s.stages = None
    with pytest.raises(ValueError, match="signals.stages"):
        FITPRUNE.select(s, 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        FITPRUNE.fn(signals(), torch.tensor([4]))
