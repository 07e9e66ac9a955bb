"""LLaVA-OneVision adapter on the tiny model: anyres layout with downsampling, SigLIP saliency without a CLS token,
pre-LLM and in-LLM pruning against the model's own computations, batched == per-sample, KV cache, cost.

Every reference is built from transformers' own model (its ``get_image_features``, the full or shortened sequence,
masks with holes, an eager copy of the vision tower), never from the adapter's splice or hooks.
"""

import checks
import pytest
import torch
from PIL import Image
from reference import REPO, eager_copy, image_positions, narrowed, padded_positions, plan

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = "llava_onevision"


@pytest.fixture(scope="module")
def adapter(one_thread):
    return checks.sdpa_adapter(FAMILY, "LlavaOnevisionAdapter")


# Width x height. 30x70: 2x1 crops (base + 2), an 8x4 patch grid, not unpadded nor downsampled: 16 + 8 * 5 = 56
# tokens. 80x50: 2x2 crops (base + 4), 8x8 patches unpadded to 6x8, above anyres_max_2 (ratio 1.22 > 1.1) so
# downsampled to 4x6: 16 + 4 * 7 = 44 tokens.
IMAGES = [Image.new("RGB", (30, 70), (200, 20, 20)), Image.new("RGB", (80, 50), (20, 30, 210))]
COUNTS = [56, 44]
CROPS = [3, 5]


def model_features(adapter, inputs):
    """Each sample's packed features from transformers' own ``get_image_features``."""
    sizes = inputs["image_sizes"]
    return adapter.model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=sizes).pooler_output


# ---------------------------------------------------------------------------------------------------------------------


def test_inputs_two_layouts_one_downsampled(adapter, inputs):
    cfg = adapter.model.config
    assert cfg.vision_feature_select_strategy == "full" and cfg.vision_aspect_ratio == "anyres_max_2"
    assert [len(image_positions(adapter, inputs, b)) for b in range(2)] == COUNTS
    assert adapter.crops_per_image(inputs["image_sizes"]) == CROPS
    assert [adapter.crop_grid(s) for s in inputs["image_sizes"]] == [(2, 1), (2, 2)]
    assert inputs["pixel_values"].shape[1] == max(CROPS)  # padded to the batch's most crops
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padded
    # 80x50 would have 16 + 6 * 9 tokens unpadded only: the model downsampled its grid.
    assert COUNTS[1] < 16 + 6 * 9


@pytest.mark.parametrize("name", ["uniform", "fastervlm", "adav"])
def test_pre_llm_pruning_equals_llm_on_shortened_sequence(adapter, inputs, gen, name):
    checks.pre_llm_equals_shortened(adapter, inputs, gen, name, COUNTS, model_features)


def test_fastv_equals_masked_reference(adapter, inputs, gen):
    checks.fastv_equals_masked(adapter, inputs, gen, COUNTS, padded_positions)


@pytest.mark.parametrize("name,options", [("uniform", {}), ("adav", {}), ("pool", {}), ("fastv", {"layer": 2})])
def test_batched_equals_per_sample(adapter, inputs, gen, name, options):
    records, alone = checks.batched_equals_per_sample(adapter, inputs, gen, plan(name, 0.4, **options), IMAGES)
    assert [r.num_visual for _, r in alone] == COUNTS
    if name != "pool":
        assert [r.num_kept for r in records] == [-(-c * 4 // 10) for c in COUNTS]


# -- the layout: every per-token map packed like the features --------------------------------------------------------


def test_packed_maps_follow_the_features(adapter, inputs):
    """pack_maps is the features' own packing (unpad, downsampling, newlines): the model's features are, channel by
    channel, the per-crop projector outputs packed through it; saliency, crop ids and patch sources go the same way."""
    model = adapter.model
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        hidden = visual.vision.hidden_states[model.config.vision_feature_layer]  # [crops, P, D]: no CLS to drop
        projected = model.model.multi_modal_projector(hidden)
        saliency = adapter.crop_cls_attention(visual.vision)
        scores = adapter.cls_attention(inputs, visual)
        sources = adapter.token_grid(inputs, visual)
    crops, patches = projected.shape[:2]
    assert crops == sum(CROPS) and patches == 16 and saliency.shape == (crops, patches)
    sizes, newline = inputs["image_sizes"], model.model.image_newline.detach()
    for d in range(projected.shape[-1]):
        packed = adapter.pack_maps(projected[..., d], sizes, float(newline[d]))
        for b in range(2):
            torch.testing.assert_close(packed[b], visual.features[b][:, d], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(scores), torch.cat(adapter.pack_maps(saliency, sizes, 0.0)))

    first = 0  # index of each image's base view among all crops
    for b, (feats, score, groups, src) in enumerate(zip(visual.features, scores, visual.groups, sources)):
        assert len(feats) == len(score) == len(groups) == len(src) == COUNTS[b]
        lines = src[:, 0] < 0
        rows = adapter.crop_grid(sizes[b])[0] * 4
        assert int(lines.sum()) == (8 if b == 0 else 4) and rows == 8
        assert torch.equal(feats[lines], newline.expand(int(lines.sum()), -1))
        assert torch.all(score[lines] == 0) and torch.all(score[~lines] > 0)
        assert torch.all(groups[lines] == CROPS[b]) and torch.equal(groups[~lines], src[~lines, 0])
        assert torch.equal(groups[:16], torch.zeros(16, dtype=torch.long))  # the base view comes first, whole
        assert set(groups[~lines].tolist()) == set(range(CROPS[b]))  # every crop has tokens
        flat = first + src[~lines, 0], src[~lines, 1] * 4 + src[~lines, 2]
        if b == 0:  # not downsampled: each token is exactly one patch's
            assert len(set(zip(*(t.tolist() for t in flat)))) == int((~lines).sum())
            torch.testing.assert_close(feats[~lines], projected[flat], atol=1e-6, rtol=1e-6)
            assert torch.equal(score[~lines], saliency[flat])
        else:  # downsampled: the base view is exact, the grid's tokens are blends, none a single patch's
            torch.testing.assert_close(feats[:16], projected[first], atol=1e-6, rtol=1e-6)
            grid = feats[16:][~lines[16:]]
            distance = (grid[:, None] - projected[first + 1 : first + CROPS[b]].flatten(0, 1)[None]).abs().amax(-1)
            assert distance.min() > 1e-3
            # ... and their nearest patch (token_grid) is distinct per token, within each crop's 4x4 grid
            assert len(set(zip(*(t.tolist() for t in flat)))) == int((~lines).sum())
            assert src[~lines, 1:].min() >= 0 and src[~lines, 1:].max() < 4
        first += CROPS[b]


def test_pre_projector_vectors_are_packed_like_the_features(adapter, inputs):
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        vectors, project = adapter.pre_projector(inputs, visual)
        hidden = visual.vision.hidden_states[adapter.model.config.vision_feature_layer]
        grid = adapter.token_grid(inputs, visual)
        assert [len(v) for v in vectors] == COUNTS
        patch = [g[:, 0] >= 0 for g in grid]
        # not downsampled: the projector of a token's own vector is its feature
        torch.testing.assert_close(project(vectors[0][patch[0]]), visual.features[0][patch[0]], atol=1e-5, rtol=1e-5)
        # downsampled: the vectors are the SigLIP outputs packed (interpolated) channel by channel
        for d in (0, 7, 31):
            torch.testing.assert_close(adapter.pack_maps(hidden[..., d], inputs["image_sizes"], 0.0)[1], vectors[1][:, d])
        torch.testing.assert_close(project(vectors[1][:16]), visual.features[1][:16], atol=1e-5, rtol=1e-5)
    assert all(torch.all(v[~p] == 0) for v, p in zip(vectors, patch))  # newline tokens: no vector


def test_cls_attention_matches_eager_vision_tower(adapter, inputs):
    """The attention each patch receives in the layer producing the used features, from an eager copy of the tower
    with ``output_attentions=True``: mean over heads and query patches, per crop; then packed like the features."""
    eager = eager_copy(adapter.model.model.vision_tower)
    pixels = torch.cat([inputs["pixel_values"][b][:n] for b, n in enumerate(CROPS)])  # the crops the model runs
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        crop_scores = adapter.crop_cls_attention(visual.vision)
        scores = adapter.cls_attention(inputs, visual)
        out = eager(pixels, output_attentions=True, output_hidden_states=True)
    layers = len(out.attentions)
    layer = adapter.model.config.vision_feature_layer % (layers + 1) - 1  # the layer producing hidden_states[-1]
    assert layer == layers - 1 == 2
    torch.testing.assert_close(out.hidden_states[-1], visual.vision.hidden_states[-1], atol=1e-5, rtol=1e-5)
    weights = out.attentions[layer]  # [crops, H, P, P]
    expected = weights.mean(dim=1).mean(dim=1)
    torch.testing.assert_close(crop_scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(crop_scores.sum(dim=1), torch.ones(sum(CROPS)), atol=1e-5, rtol=0)  # received sums to 1
    assert (crop_scores - weights[:, :, 0].mean(dim=1)).abs().max() > 1e-4  # not one query's row (there is no CLS)
    for s, e in zip(scores, adapter.pack_maps(expected, inputs["image_sizes"], 0.0)):
        torch.testing.assert_close(s, e, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores[0].sum(), torch.tensor(3.0), atol=1e-5, rtol=0)  # 3 whole crops, not unpadded


def test_token_layout_one_box_per_token(adapter, inputs):
    for b in range(2):
        layout = adapter.token_layout(inputs, b)
        assert len(layout.boxes) == COUNTS[b]
        patches = [box for box in layout.boxes if box is not None]
        assert len(set(patches)) == len(patches) == COUNTS[b] - (8, 4)[b]
        assert layout.boxes[:16] == [(8 * (i % 4), 8 * (i // 4), 8 * (i % 4) + 8, 8 * (i // 4) + 8) for i in range(16)]
        width, height = layout.image.size
        assert all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in patches)
    # 30x70: the first grid row is the two columns of crop 1's first patch row, then its newline
    layout = adapter.token_layout(inputs, 0)
    assert layout.boxes[16:21] == [(40, 0, 48, 8), (48, 0, 56, 8), (56, 0, 64, 8), (64, 0, 72, 8), None]
    # 80x50: unpadded to patch rows 1..6, downsampled 6x8 -> 4x6: boxes 1.5 patches tall, 4/3 wide
    layout = adapter.token_layout(inputs, 1)
    assert layout.boxes[16] == (40, 8, 51, 20) and layout.boxes[22] is None


# -- KV cache, synthetic inputs, cost --------------------------------------------------------------------------------


def test_pre_llm_cache_holds_kept_and_text_of_longest_sample(adapter, inputs):
    checks.pre_llm_cache(adapter, inputs, [(56, 28), (44, 22)])


def test_fastv_cache_holds_full_prompt_before_k_and_kept_after(adapter, inputs):
    checks.fastv_cache(adapter, inputs, [(56, 28), (44, 22)], padded_positions)


@pytest.mark.parametrize("name", ["uniform", "fastv"])
def test_synthetic_inputs_and_kv_bytes(adapter, name):
    synthetic = checks.synthetic_kv(adapter, name, 16)
    n = adapter.num_synthetic_visual()
    assert n == 56 and adapter.synthetic_image_size() == [64, 32]  # the pinpoint with the most tokens
    assert synthetic["input_ids"].shape == (2, n + 16) and synthetic["pixel_values"].shape[:2] == (2, 3)


def test_config_only_counts_match_the_model(adapter):
    """max_visual_tokens (from the config alone) is what the model's own packing gives at every pinpoint."""
    from vtprune.bench.kv import num_visual_tokens

    cfg = adapter.model.config
    assert num_visual_tokens(cfg) == adapter.num_synthetic_visual() == 56
    for h, w in cfg.image_grid_pinpoints:
        size = torch.tensor([[h, w]])
        crops = adapter.crops_per_image(size)[0]
        packed = adapter.pack_maps(torch.zeros(crops, 16), size, 0.0)[0]
        assert len(packed) == adapter.visual_tokens_at(cfg, h, w)
    assert adapter.visual_tokens_at(cfg, 64, 64) == 16 + 5 * 6  # 8x8 downsampled to 5x5


def test_load_generate_and_cost_of_the_7b_architecture(adapter):
    checks.pipeline_generates(FAMILY, IMAGES[0], COUNTS[0])
    n = 729 + 135 * 55  # 8154, 1920x768 px: 5x2 crops of 27x27 patches, not downsampled (ratio 1.05), a newline per row
    checks.architecture_cost("llava-onevision-7b", FAMILY, n)
    # the largest pinpoint is downsampled to 81x81 and gives fewer tokens than 1920x768
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(REPO / "configs/architectures/llava-onevision-7b")
    assert type(adapter).visual_tokens_at(hf, 2304, 2304) == 729 + 81 * 82 < n
    assert type(adapter).visual_tokens_at(hf, 384, 384) == 729 + 27 * 28


def test_7b_geometry_counts_match_the_models_packing():
    """The 7B architecture's layout (384 px crops of 27x27 patches, 36 pinpoints, anyres_max_9) on a model narrowed
    to tiny widths: the config-only count of every pinpoint is what ``pack_image_features`` gives, the processor's
    count for a large photo too, and the synthetic image is the pinpoint with the most tokens."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from vtprune.models.llava_onevision import LlavaOnevisionAdapter

    model, _ = narrowed("llava-onevision-7b", LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                        vocab_size=152128)
    model.model.image_newline = torch.nn.Parameter(torch.zeros(16))  # pack_maps only needs the config
    adapter = LlavaOnevisionAdapter(model, None)
    cfg = model.config
    counts = {}
    for h, w in cfg.image_grid_pinpoints:
        size = torch.tensor([[h, w]])
        packed = adapter.pack_maps(torch.zeros(adapter.crops_per_image(size)[0], 729), size, 0.0)[0]
        counts[(h, w)] = len(packed)
        assert len(packed) == LlavaOnevisionAdapter.visual_tokens_at(cfg, h, w), (h, w)
    assert max(counts.values()) == counts[(1920, 768)] == LlavaOnevisionAdapter.max_visual_tokens(cfg) == 8154
    assert adapter.synthetic_image_size() == [1920, 768] and adapter.num_synthetic_visual() == 8154
    assert counts[(2304, 2304)] == 7371 and counts[(384, 384)] == 729 + 27 * 28
    # a 4000x3000 photo: best fit 1920x2304 px (5x6 crops), 135x162 patches unpadded to 121x162, downsampled by
    # 1.73 to 70x93; the processor's own count (how many image tokens it writes) agrees
    from types import SimpleNamespace

    from transformers import LlavaOnevisionProcessor

    stock = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                            num_image_tokens=729, vision_aspect_ratio=cfg.vision_aspect_ratio)
    stock._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(stock)
    for height, width in ((3000, 4000), (480, 640), (1080, 1920), (2000, 500)):
        size = torch.tensor([[height, width]])
        packed = adapter.pack_maps(torch.zeros(adapter.crops_per_image(size)[0], 729), size, -1.0)[0]
        assert len(packed) == LlavaOnevisionProcessor._get_number_of_features(stock, height, width, 384, 384)
        if (height, width) == (3000, 4000):
            assert adapter.crops_per_image(size) == [31] and adapter.crop_grid(size[0]) == (5, 6)
            assert len(packed) == 729 + 70 * 94 and int((packed < 0).sum()) == 70
