"""LLaVA-NeXT adapter on the tiny model: anyres layout, saliency packing, batched == per-sample."""

import checks
import pytest
import torch
from kvcheck import expected_kv, measured_kv
from PIL import Image
from reference import plan

import vtprune

ALL = ["none", "random", "uniform", "fastervlm", "text_sim", "divprune", "adav", "fastv"]
# Different aspect ratios: different crop grids and unpadded sizes, hence different token counts.
IMAGES = [Image.new("RGB", (30, 70), (200, 20, 20)), Image.new("RGB", (90, 40), (20, 30, 210))]


@pytest.fixture(scope="module")
def adapter():
    return vtprune.load(model="tiny:llava_next").adapter


@pytest.mark.parametrize("name", ALL)
def test_keep_all_equals_unpruned(adapter, inputs, name):
    _, records = checks.keep_all(adapter, inputs, name)
    counts = (inputs["input_ids"] == adapter.image_token_id).sum(dim=1).tolist()
    assert counts[0] != counts[1]
    assert [r.num_visual for r in records] == counts and all(r.kept == list(range(r.num_visual)) for r in records)


@pytest.mark.parametrize("name,options", [("adav", {}), ("uniform", {}), ("fastv", {"layer": 2})])
def test_batched_equals_per_sample(adapter, inputs, gen, name, options):
    records, _ = checks.batched_equals_per_sample(adapter, inputs, gen, plan(name, 0.4, **options), IMAGES)
    assert [r.num_kept for r in records] == [-(-r.num_visual * 4 // 10) for r in records]


def token_sources(adapter, inputs, visual):
    """Pack a map coding (crop, patch) through the adapter: the (crop, patch) behind every token, -1 on newlines."""
    crops, patches = visual.vision.hidden_states[0].shape[0], visual.vision.hidden_states[0].shape[1] - 1
    code = torch.arange(crops * patches, dtype=torch.float32).view(crops, patches)
    return [p.round().long() for p in adapter.pack_maps(code, inputs["image_sizes"], -1.0)], patches


def test_packed_maps_follow_the_features(adapter, inputs):
    model = adapter.model
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        sources, patches = token_sources(adapter, inputs, visual)
        hidden = visual.vision.hidden_states[model.config.vision_feature_layer][:, 1:]
        projected = model.model.multi_modal_projector(hidden)  # [crops, P, D] before any packing
        saliency = adapter.crop_cls_attention(visual.vision)
        scores = adapter.cls_attention(inputs, visual)
    newline = model.model.image_newline
    for feats, src, score, groups in zip(visual.features, sources, scores, visual.groups):
        assert len(src) == len(feats) == len(score) == len(groups)
        lines = src < 0
        assert lines.any() and torch.equal(feats[lines], newline.expand(int(lines.sum()), -1))
        crop, patch = src[~lines] // patches, src[~lines] % patches
        torch.testing.assert_close(feats[~lines], projected[crop, patch], atol=1e-6, rtol=1e-6)
        assert torch.equal(score[~lines], saliency[crop, patch]) and torch.all(score[lines] == 0)
        local = crop - crop.min()  # crop index within this image: base view 0, crops 1..n
        assert torch.equal(groups[~lines], local) and torch.all(groups[lines] == local.max() + 1)
        assert torch.all(groups[:patches] == 0)


def test_fastv_cache_and_kv_bytes(adapter):
    p = plan("fastv", 0.5, layer=1)
    synthetic = adapter.synthetic_inputs(2, 16, torch.Generator().manual_seed(0))
    n = adapter.num_synthetic_visual()
    assert (synthetic["input_ids"] == adapter.image_token_id).sum(dim=1).tolist() == [n, n]
    with torch.no_grad(), adapter.applied(synthetic, p) as state:
        out = adapter.model(**synthetic, use_cache=True)
    kept = [r.num_kept for r in state.records]
    assert [layer.keys.shape[-2] for layer in out.cache.layers][1:] == [16 + kept[0]] * 3
    assert measured_kv(adapter, out.cache) == expected_kv(adapter, p, batch_size=2, text_tokens=16, num_visual=n, num_kept=max(kept))
