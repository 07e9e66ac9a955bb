"""LLaVA-OneVision adapter on the tiny model: anyres layout with downsampling, SigLIP saliency without a CLS token,
pre-LLM and in-LLM pruning against the model's own computations, batched == per-sample, KV cache, cost.

Every reference is built from transformers' own model (its ``get_image_features``, the full or shortened sequence,
masks with holes, an eager copy of the vision tower), never from the adapter's splice or hooks.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from kvcheck import expected_kv, measured_kv
from PIL import Image
from reference import masked_layer_hooks, plan

import vtprune
from vtprune.models import FAMILIES
from vtprune.models.base import left_pad_positions
from vtprune.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]
FAMILY = "llava_onevision"
RUNS = [s for s, st in STRATEGIES.items() if FAMILIES.get(FAMILY).runs(st)]
# Width x height. 30x70: 2x1 crops (base + 2), an 8x4 patch grid, not unpadded nor downsampled: 16 + 8 * 5 = 56
# tokens. 80x50: 2x2 crops (base + 4), 8x8 patches unpadded to 6x8, above anyres_max_2 (ratio 1.22 > 1.1) so
# downsampled to 4x6: 16 + 4 * 7 = 44 tokens.
IMAGES = [Image.new("RGB", (30, 70), (200, 20, 20)), Image.new("RGB", (80, 50), (20, 30, 210))]
PROMPTS = ["What is shown?", "How many objects are there in the picture please?"]
COUNTS = [56, 44]
CROPS = [3, 5]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from intra-op threads, and on a shared CPU their spin-waits make every op up to
    # 100x slower; restored for the tests that run after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(one_thread):
    a = vtprune.load(model=f"tiny:{FAMILY}", device="cpu", dtype="float32", attn_implementation="sdpa").adapter
    assert type(a).__name__ == "LlavaOnevisionAdapter" and a.model.dtype == torch.float32
    return a


@pytest.fixture(scope="module")
def inputs(adapter):
    return adapter.prepare(IMAGES, PROMPTS)


@pytest.fixture(scope="module")
def gen(adapter):
    return {"max_new_tokens": 4, "do_sample": False, "pad_token_id": adapter.processor.tokenizer.pad_token_id}


def image_positions(adapter, inputs, b):
    return torch.nonzero(inputs["input_ids"][b] == adapter.image_token_id).flatten()


def holed_mask(adapter, inputs, kept):
    """The 2-D padding mask with holes at every pruned image token (``kept``: per sample, into its visual tokens)."""
    mask = inputs["attention_mask"].bool().clone()
    for b, keep in enumerate(kept):
        pos = image_positions(adapter, inputs, b)
        hide = torch.ones(len(pos), dtype=torch.bool)
        hide[torch.tensor(keep, dtype=torch.long)] = False
        mask[b, pos[hide]] = False
    return mask


def shortened_embeds(adapter, inputs, kept):
    """The LLM input of the pruned prompts, built from the model's own features: each sample's text embeddings and
    kept features in order, left padded again; with its mask."""
    model = adapter.model
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    stays = holed_mask(adapter, inputs, kept)
    rows = []
    for b in range(len(kept)):
        row = embeds[b].clone()
        row[image_positions(adapter, inputs, b)] = feats[b]
        rows.append(row[stays[b]])
    length = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), length, embeds.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, length - len(r) :], mask[b, length - len(r) :] = r, 1
    return batch, mask


def no_hooks_left(adapter):
    lm = adapter.model.model.language_model
    return not lm._forward_pre_hooks and not any(layer._forward_pre_hooks or layer._forward_hooks for layer in lm.layers)


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
    p = plan(name, 0.5)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        kept = [r.kept for r in records]
        batch, mask = shortened_embeds(adapter, inputs, kept)
        ref = adapter.model(inputs_embeds=batch, attention_mask=mask, position_ids=left_pad_positions(mask)).logits[:, -1]
        ref_new = adapter.model.generate(inputs_embeds=batch, attention_mask=mask, **gen)
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    assert [r.num_kept for r in records] == [c // 2 for c in COUNTS]
    assert [r.kept for r in gen_records] == kept
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-3  # the pruning does change the output
    assert torch.equal(new, ref_new)
    assert torch.equal(new[:, 0], logits.argmax(-1))


def test_fastv_equals_masked_reference(adapter, inputs, gen):
    k = 2
    p = plan("fastv", 0.5, layer=k)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        assert no_hooks_left(adapter)
        kept = [r.kept for r in records]
        handles = masked_layer_hooks(adapter.decoder_layers, holed_mask(adapter, inputs, kept), k)
        try:
            ref = adapter.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"])).logits[:, -1]
            ref_new = adapter.model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
        finally:
            for h in handles:
                h.remove()
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-3
    assert [r.kept for r in gen_records] == kept
    assert torch.equal(new, ref_new)
    layers = len(adapter.decoder_layers)
    assert [r.num_kept for r in records] == [c // 2 for c in COUNTS]
    assert all(r.equivalent_tokens == (k * r.num_visual + (layers - k) * r.num_kept) / layers for r in records)


@pytest.mark.parametrize("name,options", [("uniform", {}), ("adav", {}), ("pool", {}), ("fastv", {"layer": 2})])
def test_batched_equals_per_sample(adapter, inputs, gen, name, options):
    p = plan(name, 0.4, **options)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        for b in range(2):
            one = adapter.prepare(IMAGES[b : b + 1], PROMPTS[b : b + 1])
            alone_logits, alone = adapter.prefill_logits(one, p)
            alone_new, alone_gen = adapter.generate(one, p, **gen)
            assert alone[0].kept == alone_gen[0].kept == records[b].kept == gen_records[b].kept
            assert alone[0].merged == records[b].merged and alone[0].num_visual == COUNTS[b]
            torch.testing.assert_close(alone_logits[0], logits[b], atol=1e-4, rtol=1e-4)
            assert torch.equal(alone_new[0], new[b])
    if name != "pool":
        assert [r.num_kept for r in records] == [-(-c * 4 // 10) for c in COUNTS]
    assert torch.equal(new[:, 0], logits.argmax(-1))


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
    tower = adapter.model.model.vision_tower
    config = copy.deepcopy(tower.config)  # the model's own config object stays sdpa
    eager = type(tower)._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(tower.state_dict())
    assert eager.config._attn_implementation == "eager" and tower.config._attn_implementation == "sdpa"
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
    with torch.no_grad():
        spliced, records = adapter.spliced(inputs, plan("uniform", 0.5))
        out = adapter.model(**spliced, use_cache=True)
    valid = inputs["attention_mask"].sum(dim=1).tolist()
    lengths = [v - r.num_visual + r.num_kept for v, r in zip(valid, records)]  # text + kept per sample
    assert [(r.num_visual, r.num_kept) for r in records] == [(56, 28), (44, 22)]
    assert max(lengths) < max(valid)
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [max(lengths)] * 4
    assert [layer.values.shape[-2] for layer in out.cache.layers] == [max(lengths)] * 4


def test_fastv_cache_holds_full_prompt_before_k_and_kept_after(adapter, inputs):
    k = 2
    with torch.no_grad(), adapter.applied(inputs, plan("fastv", 0.5, layer=k)) as state:
        out = adapter.model(**inputs, position_ids=left_pad_positions(inputs["attention_mask"]), use_cache=True)
    full = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].sum(dim=1).tolist()
    short = max(v - r.num_visual + r.num_kept for v, r in zip(valid, state.records))
    assert [(r.num_visual, r.num_kept) for r in state.records] == [(56, 28), (44, 22)]
    assert short == state.gather.shape[1] < full
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [full] * k + [short] * (4 - k)
    assert no_hooks_left(adapter)


@pytest.mark.parametrize("name", ["uniform", "fastv"])
def test_synthetic_inputs_and_kv_bytes(adapter, name):
    p = plan(name, 0.5)
    synthetic = adapter.synthetic_inputs(2, 16, torch.Generator().manual_seed(0))
    n = adapter.num_synthetic_visual()
    assert n == 56 and adapter.synthetic_image_size() == [64, 32]  # the pinpoint with the most tokens
    assert synthetic["input_ids"].shape == (2, n + 16) and synthetic["pixel_values"].shape[:2] == (2, 3)
    assert (synthetic["input_ids"] == adapter.image_token_id).sum(dim=1).tolist() == [n, n]
    with torch.no_grad():
        if name == "fastv":
            with adapter.applied(synthetic, p) as state:
                out = adapter.model(**synthetic, use_cache=True)
            records = state.records
            assert [layer.keys.shape[-2] for layer in out.cache.layers][2:] == [16 + n // 2] * 2
        else:
            spliced, records = adapter.spliced(synthetic, p)
            out = adapter.model(**spliced, use_cache=True)
    assert [r.num_kept for r in records] == [n // 2] * 2
    expected = expected_kv(adapter, p, batch_size=2, text_tokens=16, num_visual=n, num_kept=n // 2)
    assert measured_kv(adapter, out.cache) == expected


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
    from vtprune.bench import cost_for_config
    from vtprune.config import load_config

    pipe = vtprune.load(model=f"tiny:{FAMILY}")
    out = pipe.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=2)
    assert out[0].num_visual == COUNTS[0] and out[0].kept == list(range(COUNTS[0]))

    path = REPO / "configs/architectures/llava-onevision-7b.yaml"
    config = load_config(path)
    assert config.model.weights == "random"
    rows = cost_for_config(config, batch_sizes=[1, 8], ratios=[1.0, 0.25], strategies=["none", "uniform", "fastv"])
    text = json.loads((REPO / "configs/architectures/llava-onevision-7b/config.json").read_text())["text_config"]
    layers, kv_heads, head_dim = text["num_hidden_layers"], text["num_key_value_heads"], text["hidden_size"] // text["num_attention_heads"]
    assert (layers, kv_heads, head_dim) == (28, 4, 128)
    n = 729 + 135 * 55  # 1920x768 px: 5x2 crops of 27x27 patches, not downsampled (ratio 1.05), a newline per row
    assert all(r["num_visual"] == n == 8154 and r["family"] == FAMILY for r in rows)
    by = {(r["strategy"], r["keep_ratio"], r["batch_size"]): r for r in rows}
    per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    prompt = config.bench.prompt_tokens
    assert by[("none", 1.0, 1)]["kv_bytes"] == per_token * (n + prompt)
    assert by[("uniform", 0.25, 8)]["kv_bytes"] == 8 * per_token * (-(-n // 4) + prompt)
    assert by[("uniform", 0.25, 1)]["num_kept"] == -(-n // 4)
    assert 1 < by[("uniform", 0.25, 1)]["ideal_ttft_speedup"] < 4
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

    data = json.loads((REPO / "configs/architectures/llava-onevision-7b/config.json").read_text())
    data["vision_config"].update(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    data["text_config"].update(vocab_size=152128, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
    data.pop("architectures"), data.pop("model_type")
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**data))
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
