"""Signals by name: a strategy runs on every family that provides what it needs, and it really runs there."""

import pytest
import torch
from PIL import Image
from reference import eager_copy

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
    assert llava.provides("in_llm") == ("hidden_states", "last_token_attention", "text_attention", "text_attention_max",
                                        "text_hidden_states", "visual_attention_max")
    assert llava.provides("pre_llm") == ("cls_attention", "features", "grid", "groups", "text_embeds", "vision_attention",
                                         "vision_cls_attention")
    assert llava.provides("vision") == ("vision_keys", "vision_layer_attention", "vision_semantic", "vision_values")
    # Qwen2.5-VL inherits LLaVA's providers but cannot compute these (its window blocks, its merger): not listed
    assert not {"vision_attention", "vision_keys"} & set(FAMILIES.get("qwen2_5_vl").provides())
    assert FAMILIES.get("llava_next").provides("vision") == ()


def _vision_signals(family, images):
    adapter = vtprune.load(model=f"tiny:{family}", device="cpu", dtype="float32").adapter
    inputs = adapter.prepare(images, ["What is shown?", "Which colour is it?"][: len(images)])
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        needs = ("vision_attention", "cls_attention", "grid", "vision_cls_attention")
        signals = adapter.signals(inputs, visual, tuple(n for n in needs if n in adapter.provides()))
    return adapter, inputs, signals


def test_vision_attention_is_the_towers_own_attention_received_per_layer():
    # LLaVA's CLIP run eagerly with output_attentions: per layer, head and query-row mean, CLS column dropped
    adapter, inputs, signals = _vision_signals("llava", [_image(3), _image(4)])
    with torch.no_grad():
        out = eager_copy(adapter.model.model.vision_tower)(inputs["pixel_values"], output_attentions=True)
    index, _ = adapter.feature_layer(adapter.visual_tokens(inputs).vision)
    expected = torch.stack([a.mean(dim=1).mean(dim=1)[:, 1:] for a in out.attentions[: index + 1]], dim=1)
    assert signals.vision_attention.shape == (2, index + 1, 16)
    torch.testing.assert_close(signals.vision_attention, expected, atol=1e-5, rtol=1e-5)
    # every query row's softmax sums to 1: the patches get all of it but what the CLS token receives
    assert bool((signals.vision_attention.sum(-1) < 1).all()) and bool((signals.vision_attention > 0).all())


def test_vision_attention_is_packed_like_the_features():
    # LLaVA-NeXT: newline tokens (no patch) and padding get 0; a CLS-less tower's last layer is its saliency
    _, _, signals = _vision_signals("llava_next", [_image(5).resize((112, 56)), _image(6)])
    patchless = (signals.grid[..., 0] < 0).unsqueeze(1).expand_as(signals.vision_attention)
    assert bool(patchless.any()) and bool((signals.vision_attention[patchless] == 0).all())
    assert bool((signals.vision_attention[~patchless] > 0).all())
    _, _, signals = _vision_signals("llava_onevision", [_image(7), _image(8).resize((80, 50))])
    assert torch.equal(signals.vision_attention[:, -1], signals.cls_attention)
    assert not torch.equal(signals.vision_attention[:, 0], signals.vision_attention[:, -1])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_text_attention_is_the_layers_own_attention_of_the_text_rows(family):
    # the eager model's attentions (left padded batch of two prompts of different lengths), head mean, text rows
    # after the image, image columns; Qwen2.5-VL's M-RoPE cos/sin go through the same formula
    from vtprune.models.llava import rows_attention

    adapter = vtprune.load(model=f"tiny:{family}", device="cpu", dtype="float32").adapter
    inputs = adapter.prepare([_image(9), _image(10)], ["What is shown?", "How many objects are in the picture?"])
    lm = adapter.model.model.language_model
    adapter.model.config.get_text_config()._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = adapter.model(**inputs, position_ids=adapter.prompt_positions(inputs), output_attentions=True,
                                output_hidden_states=True)
            captured = {}
            handle = lm.layers[1].register_forward_pre_hook(
                lambda m, a, kw: captured.update(kw), with_kwargs=True)
            adapter.model(**inputs, position_ids=adapter.prompt_positions(inputs))
            handle.remove()
    finally:
        adapter.model.config.get_text_config()._attn_implementation = "sdpa"
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    text_pos = adapter.text_positions(ids, mask)
    image_pos = [torch.nonzero(row == adapter.image_token_id).flatten() for row in ids]
    with torch.no_grad():
        maps = rows_attention(lm.layers[1], out.hidden_states[1], captured["position_embeddings"], mask, text_pos,
                              image_pos)
        most = rows_attention(lm.layers[1], out.hidden_states[1], captured["position_embeddings"], mask, image_pos,
                              image_pos, "max")
    assert not mask[0].all() and mask[1].all()  # the shorter prompt is left padded
    for b in range(2):
        expected = out.attentions[1][b].mean(dim=0)[text_pos[b]][:, image_pos[b]]
        torch.testing.assert_close(maps[b], expected, atol=1e-5, rtol=1e-4)
        # the visual rows, head max (FitPrune's map): causal, so each visual token sees only those before it
        expected = out.attentions[1][b].max(dim=0).values[image_pos[b]][:, image_pos[b]]
        torch.testing.assert_close(most[b], expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(most[b].triu(1), torch.zeros_like(most[b]))


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_vision_cls_attention_ends_at_the_saliency_every_cls_strategy_ranks_by(family):
    # its last layer is the one cls_attention reads, packed the same way (crops, newlines, pixel shuffle)
    _, _, signals = _vision_signals(family, [_image(11), _image(12).resize((112, 56))])
    torch.testing.assert_close(signals.vision_cls_attention[:, -1], signals.cls_attention)
    assert not torch.allclose(signals.vision_cls_attention[:, 0], signals.vision_cls_attention[:, -1])


def test_vision_cls_attention_is_the_towers_own_cls_row_per_layer():
    adapter, inputs, _ = _vision_signals("llava", [_image(13), _image(14)])
    with torch.no_grad():
        signals = adapter.signals(inputs, adapter.visual_tokens(inputs), ("vision_cls_attention",))
        out = eager_copy(adapter.model.model.vision_tower)(inputs["pixel_values"], output_attentions=True)
    layers = signals.vision_cls_attention.shape[1]
    expected = torch.stack([a.mean(dim=1)[:, 0, 1:] for a in out.attentions[:layers]], dim=1)
    torch.testing.assert_close(signals.vision_cls_attention, expected, atol=1e-5, rtol=1e-5)
