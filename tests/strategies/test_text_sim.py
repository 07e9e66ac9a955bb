"""text_sim on hand-made embeddings: AdaV's relevance alone, top-k."""

import torch

from vtprune.strategies import STRATEGIES, Signals

TEXT_SIM = STRATEGIES.get("text_sim")


def signals():
    # text A = e0 matches tokens 0 and 1 (softmax 1/2 each), text B = e1 matches token 2 alone (1),
    # token 3 matches nothing (~0). Raw max cosine would tie 0, 1, 2 at 1; relevance ranks 2 first.
    # Sample 1 is sample 0 behind two padding tokens aligned with text B (never candidates).
    text = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]] * 2)
    tokens = [[2.0, 0, 0], [1.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]
    features = torch.tensor([tokens + [[0, 0, 1.0]] * 2, [[0, 1.0, 0]] * 2 + tokens])
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    return Signals(valid=valid, features=features, text_embeds=text, text_valid=torch.ones(2, 2, dtype=torch.bool))


def test_text_sim_keeps_the_most_relevant_tokens():
    # budget ceil(0.5 · 4) = 2: token 2 (1.0), then 0 and 1 tie at 0.5 -> the lower index 0
    assert [k.tolist() for k in TEXT_SIM.select(signals(), 0.5)] == [[0, 2], [2, 4]]
    # budget 1: only token 2; padding aligned with text B would otherwise take it
    assert [k.tolist() for k in TEXT_SIM.select(signals(), 0.25)] == [[2], [4]]


def test_text_sim_keep_all_keeps_every_valid_token():
    assert [k.tolist() for k in TEXT_SIM.select(signals(), 1.0)] == [[0, 1, 2, 3], [2, 3, 4, 5]]
