"""Signals by name: a strategy runs on every family that provides what it needs, and it really runs there."""

import pytest
import torch
from PIL import Image

import vtprune
from vtprune.models import FAMILIES
from vtprune.strategies import STRATEGIES


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("family", ["llava", "llava_next", "mllama"])
def test_every_strategy_the_registry_allows_runs(family):
    base = vtprune.load(model=f"tiny:{family}")
    runnable = [name for name, s in STRATEGIES.items() if FAMILIES.get(family).runs(s)]
    assert "none" in runnable and "uniform" in runnable and "cls_saliency" in runnable
    for name in runnable:
        pipe = base.with_pruning(name, 0.5)
        inputs = pipe.prepare([_image(0), _image(1)], ["What is shown?", "Which colour?"])
        _, records = pipe.adapter.prefill_logits(inputs, pipe.plan)
        for r in records:
            assert r.num_kept >= 1 and r.kept == sorted(set(r.kept)) and max(r.kept) < r.num_visual, name


@pytest.mark.parametrize("family", ["llava", "mllama"])
def test_cls_saliency_and_fastervlm_are_one_rule_on_every_family(family):
    base = vtprune.load(model=f"tiny:{family}")
    kept = {}
    for name in ("cls_saliency", "fastervlm"):
        pipe = base.with_pruning(name, 0.25)
        out = pipe.generate([_image(2)], ["What is shown?"], max_new_tokens=1)
        kept[name] = out[0].kept
    assert kept["cls_saliency"] == kept["fastervlm"] and 0 < len(kept["fastervlm"])


def test_a_family_lists_the_signals_it_computes():
    assert FAMILIES.get("mllama").provides() == ("cls_attention", "cross_attention", "groups")
    llava = FAMILIES.get("llava")
    assert llava.provides("in_llm") == ("hidden_states", "last_token_attention", "text_hidden_states")
    assert llava.provides("pre_llm") == ("cls_attention", "features", "grid", "groups", "text_embeds")
