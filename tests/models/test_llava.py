"""LLaVA-1.5 adapter on the tiny model: pre-LLM pruning, fastv inside the LLM, CLS saliency, KV cache."""

import checks
import pytest
import torch
from kvcheck import expected_kv, measured_kv
from PIL import Image
from reference import holed_mask, hooked, masked_layer_hooks, plan, shortened_embeds

import vtprune
from vtprune.models.base import left_pad_positions

ALL = ["none", "random", "uniform", "fastervlm", "text_sim", "divprune", "adav", "fastv"]
IMAGES = [Image.new("RGB", (30, 70), (200, 20, 20)), Image.new("RGB", (90, 40), (20, 30, 210))]


@pytest.fixture(scope="module")
def adapter():
    return vtprune.load(model="tiny:llava").adapter


def masked_reference_hooks(adapter, inputs, kept, k):
    """Hooks on layers[k:] that hide the pruned image tokens from attention: the full-length equivalent of fastv."""
    return masked_layer_hooks(adapter.decoder_layers, holed_mask(adapter, inputs, kept), k)


@pytest.mark.parametrize("name", ALL)
def test_keep_all_equals_unpruned(adapter, inputs, name):
    _, records = checks.keep_all(adapter, inputs, name)
    assert all(r.kept == list(range(r.num_visual)) and r.num_visual == 16 for r in records)


def test_pre_llm_pruning_equals_llm_on_shortened_embeds(adapter, inputs):
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, plan("uniform", 0.5))
        feats = adapter.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        batch, mask = shortened_embeds(adapter, inputs, [r.kept for r in records], feats)
        positions = left_pad_positions(mask)
        ref = adapter.model(inputs_embeds=batch, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert [r.num_kept for r in records] == [8, 8]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_fastv_equals_masked_reference(adapter, inputs, k):
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, plan("fastv", 0.25, layer=k))
        with hooked(masked_reference_hooks(adapter, inputs, [r.kept for r in records], k)):
            ref = adapter.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"])).logits[:, -1]
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-4  # the pruning does change the output
    layers = len(adapter.decoder_layers)
    assert all(r.num_kept == 4 and r.equivalent_tokens == (k * 16 + (layers - k) * 4) / layers for r in records)
    assert not any(layer._forward_pre_hooks for layer in adapter.decoder_layers)


def test_fastv_scores_match_eager_attention(inputs):
    eager = vtprune.load(model="tiny:llava", attn_implementation="eager").adapter
    k = 2
    with torch.no_grad():
        _, records = eager.prefill_logits(inputs, plan("fastv", 0.25, layer=k))
        out = eager.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"]), output_attentions=True)
    for b, rec in enumerate(records):
        pos = torch.nonzero(inputs["input_ids"][b] == eager.image_token_id).flatten()
        scores = out.attentions[k - 1][b, :, -1, pos].mean(dim=0)
        assert rec.kept == sorted(scores.topk(4).indices.tolist())


def test_fastv_generate_uses_pruned_cache_and_equals_reference(adapter, inputs):
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=adapter.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        new, records = adapter.generate(inputs, plan("fastv", 0.25, layer=2), **gen)
        with hooked(masked_reference_hooks(adapter, inputs, [r.kept for r in records], 2)):
            ref = adapter.model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
        for b in range(2):
            one = adapter.prepare(IMAGES[b : b + 1], checks.PROMPTS[b : b + 1])
            alone, _ = adapter.generate(one, plan("fastv", 0.25, layer=2), **gen)
            assert torch.equal(alone[0], new[b])
    assert torch.equal(new, ref)


def test_fastv_cache_holds_only_kept_tokens_after_layer_k(adapter, inputs):
    p = plan("fastv", 0.25, layer=2)
    with torch.no_grad(), adapter.applied(inputs, p):
        out = adapter.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"]), use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    full = inputs["input_ids"].shape[1]
    assert lengths == [full, full, full - 12, full - 12]
    expected = expected_kv(adapter, p, batch_size=2, text_tokens=full - 16, num_visual=16, num_kept=4)
    assert measured_kv(adapter, out.cache) == expected


@pytest.mark.parametrize("name", ["uniform", "fastv"])
def test_synthetic_inputs_and_kv_bytes(adapter, name):
    p = plan(name, 0.5)
    inputs = adapter.synthetic_inputs(2, 16, torch.Generator().manual_seed(0))
    assert inputs["input_ids"].shape == (2, 16 + 16) and (inputs["input_ids"] == adapter.image_token_id).sum() == 32
    with torch.no_grad():
        if name == "fastv":
            with adapter.applied(inputs, p):
                out = adapter.model(**inputs, use_cache=True)
        else:
            embeds, mask, _ = adapter.pruned_inputs(inputs, p)
            out = adapter.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    assert measured_kv(adapter, out.cache) == expected_kv(adapter, p, batch_size=2, text_tokens=16, num_visual=16, num_kept=8)


def test_pruned_generate_batched_equals_per_sample(adapter, inputs):
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=adapter.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        new, records = adapter.generate(inputs, plan("fastervlm", 0.5), **gen)
        first, _ = adapter.prefill_logits(inputs, plan("fastervlm", 0.5))
        for b in range(2):
            alone, rec = adapter.generate(adapter.prepare(IMAGES[b : b + 1], checks.PROMPTS[b : b + 1]), plan("fastervlm", 0.5), **gen)
            assert torch.equal(alone[0], new[b]) and rec[0].kept == records[b].kept
    assert torch.equal(new[:, 0], first.argmax(-1))


def test_cls_attention_matches_eager_vision_tower(adapter, inputs):
    from transformers import CLIPVisionModel

    tower = adapter.model.model.vision_tower
    config = tower.config.__class__.from_dict(tower.config.to_dict())
    config._attn_implementation = "eager"
    eager = CLIPVisionModel(config).eval()
    eager.load_state_dict(tower.state_dict())
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        scores = adapter.cls_attention(inputs, visual)
        out = eager(inputs["pixel_values"], output_attentions=True)
    layer = len(out.attentions) + adapter.model.config.vision_feature_layer  # the layer producing hidden_states[-2]
    expected = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    assert len(scores) == 2 and scores[0].shape == (16,)
    torch.testing.assert_close(torch.stack(scores), expected, atol=1e-6, rtol=1e-5)


def test_selection_time_excludes_the_vision_tower(adapter, inputs, monkeypatch):
    # The vision tower runs whether or not tokens are pruned, so it is not the pruning's overhead.
    import time

    tower = adapter.visual_tokens

    def slow_tower(batch):
        time.sleep(0.5)
        return tower(batch)

    monkeypatch.setattr(adapter, "visual_tokens", slow_tower)
    with torch.no_grad():
        _, _, records = adapter.pruned_inputs(inputs, plan("uniform", 0.5))
    assert 0 < sum(r.select_seconds for r in records) < 0.5


# -- multi-stage in-LLM pruning (pdrop): each stage ≡ masking what it dropped in its layers, every layer caches
# what its stage kept, decode works over the per-stage caches.


def stage_masks(adapter, inputs, state) -> list:
    """Per stage: hooks on its layers that hide every image token its stage no longer has."""
    layers = adapter.decoder_layers
    bounds = [s.layer for s in state.stages] + [len(layers)]
    handles = []
    for stage, end in zip(state.stages, bounds[1:]):
        base = holed_mask(adapter, inputs, [keep.tolist() for keep in stage.visual])
        handles += masked_layer_hooks(layers, base, stage.layer, end)
    return handles


def test_default_stages_are_the_quarters_of_the_depth(adapter):
    assert adapter.placement(plan("pdrop", 0.5)).layers == (1, 2, 3)  # 4 decoder layers
    assert adapter.placement(plan("pdrop", 0.5, layers=[2, 3])).layers == (2, 3)


def test_each_stage_equals_masking_what_it_dropped(adapter, inputs):
    p = plan("pdrop", 0.5)
    positions = left_pad_positions(inputs["attention_mask"])
    with torch.no_grad():
        with adapter.applied(inputs, p) as state:
            logits = adapter.model(**inputs, position_ids=positions).logits[:, -1]
        with hooked(stage_masks(adapter, inputs, state)):
            ref = adapter.model(**inputs, position_ids=positions).logits[:, -1]
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-4
    # 16 visual tokens: stages keep 8, 4, 2; each stage's set lies inside the previous one's
    assert [[len(v) for v in s.visual] for s in state.stages] == [[8, 8], [4, 4], [2, 2]]
    for earlier, later in zip(state.stages, state.stages[1:]):
        assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(earlier.visual, later.visual))
    records = state.records
    assert all(r.stage_kept == [8, 4, 2] and r.kept == s.tolist() for r, s in zip(records, state.stages[-1].visual))
    assert all(r.equivalent_tokens == (16 + 8 + 4 + 2) / 4 for r in records)
    assert not any(layer._forward_pre_hooks for layer in adapter.decoder_layers)


def test_every_layer_caches_what_its_stage_kept(adapter, inputs):
    p = plan("pdrop", 0.5)
    with torch.no_grad(), adapter.applied(inputs, p):
        out = adapter.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"]), use_cache=True)
    full = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [full, full - 8, full - 12, full - 14]
    expected = expected_kv(adapter, p, batch_size=2, text_tokens=full - 16, num_visual=16, num_kept=[8, 4, 2])
    assert measured_kv(adapter, out.cache) == expected


def test_generate_over_the_stage_caches_equals_the_masked_reference(adapter, inputs):
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=adapter.processor.tokenizer.pad_token_id)
    p = plan("pdrop", 0.5)
    with torch.no_grad():
        with adapter.applied(inputs, p) as state:
            new = adapter.model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
        with hooked(stage_masks(adapter, inputs, state)):
            ref = adapter.model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
        pipe_new, records = adapter.generate(inputs, p, **gen)
    assert torch.equal(new, ref) and torch.equal(pipe_new, new)
    assert [r.stage_kept for r in records] == [[8, 4, 2]] * 2


def test_bad_stage_layers_are_one_line():
    from vtprune.config import config_from_dict
    from vtprune.errors import ConfigError

    base = {"name": "t", "model": {"path": "tiny:llava"}}
    with pytest.raises(ConfigError, match=r"pruning.placement.layers: \[2, 1\] must be increasing"):
        config_from_dict({**base, "pruning": {"strategy": "pdrop", "placement": {"layers": [2, 1]}}})
    with pytest.raises(ConfigError, match=r"pruning.placement.layers: 4 is outside the allowed range \[1, 3\]"):
        config_from_dict({**base, "pruning": {"strategy": "pdrop", "placement": {"layers": [1, 4]}}})
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({**base, "pruning": {"strategy": "pdrop", "placement": {"layer": 1, "layers": [2]}}})
