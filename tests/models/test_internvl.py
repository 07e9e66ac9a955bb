"""InternVL3 adapter on the tiny model: dynamic tiles with a thumbnail, pixel shuffle, InternViT CLS saliency, pre-LLM and
in-LLM pruning against the model's own computations, batched == per-sample, KV cache, cost.

Every reference is built from transformers' own model (its ``get_image_features``, the full or shortened sequence,
masks with holes, an eager copy of the vision tower), never from the adapter's splice or hooks.
"""

import checks
import numpy as np
import pytest
import torch
from PIL import Image
from reference import eager_copy, image_positions, narrowed, padded_positions, plan

from vtprune.models import FAMILIES
from vtprune.strategies import STRATEGIES, budget

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = "internvl"
RUNS = [s for s, st in STRATEGIES.items() if FAMILIES.get(FAMILY).runs(st)]


def picture(width, height, phase=0.0):
    """A smooth picture (not a flat colour): tiles differ, and the thumbnail shows what the tiles show."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 5.0 + phase)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


# Width x height, 64 px tiles of 16 tokens, at most 4 grid tiles. 30x70: 1 column x 2 rows + the thumbnail = 3 tiles,
# 48 tokens. 100x100: 2x2 + the thumbnail = 5 tiles, 80 tokens.
IMAGES = [picture(30, 70), picture(100, 100, 1.0)]
TILES = [3, 5]
COUNTS = [48, 80]
PER_TILE = 16


@pytest.fixture(scope="module")
def adapter(one_thread):
    return checks.sdpa_adapter(FAMILY, "InternVLAdapter")


def model_features(adapter, inputs):
    """Each sample's projector outputs from transformers' own ``get_image_features``: its tiles' tokens in order."""
    feats = adapter.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # [tiles, 16, D]
    return [f.flatten(0, 1) for f in torch.split(feats, TILES)]


# ---------------------------------------------------------------------------------------------------------------------


def test_inputs_one_run_of_tiles_per_image(adapter, inputs):
    cfg, processor = adapter.model.config, adapter.processor
    assert cfg.vision_feature_select_strategy == "default" and cfg.downsample_ratio == 0.5
    assert type(processor).__name__ == "InternVLProcessor" and processor.image_seq_length == PER_TILE
    assert inputs["pixel_values"].shape == (sum(TILES), 3, 64, 64)  # every tile of the batch, samples in order
    assert adapter.tiles_per_sample(inputs) == TILES
    ids = inputs["input_ids"]
    for b in range(2):
        pos = image_positions(adapter, inputs, b)
        assert len(pos) == COUNTS[b] and torch.equal(pos, torch.arange(pos[0], pos[0] + COUNTS[b]))  # one run
        assert ids[b, pos[0] - 1] == processor.start_image_token_id and ids[b, pos[-1] + 1] == processor.end_image_token_id
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padded


def test_every_self_attention_strategy_runs_on_the_family():
    adapter = FAMILIES.get(FAMILY)
    assert {"none", "random", "uniform", "fastervlm", "cls_saliency", "adav", "text_sim", "divprune", "fastv", "pool",
            "downsample", "visionzip", "vispruner", "hired", "cdpruner", "dart", "pdrop"} <= set(RUNS)
    assert not adapter.runs(STRATEGIES.get("trimmed_llama"))


@pytest.mark.parametrize("name", ["uniform", "fastervlm", "adav"])
def test_pre_llm_pruning_equals_llm_on_shortened_sequence(adapter, inputs, gen, name):
    checks.pre_llm_equals_shortened(adapter, inputs, gen, name, COUNTS, model_features)


def test_fastv_equals_masked_reference(adapter, inputs, gen):
    checks.fastv_equals_masked(adapter, inputs, gen, COUNTS, padded_positions)


def test_pool_merges_2x2_windows_within_each_tile(adapter, inputs):
    p = plan("pool", 0.25)
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        selection = p.select(adapter.signals(inputs, visual, p.strategy.needs))[0][1]
    grid = adapter.token_grid(inputs, visual)[1]
    assert selection.num_merged == COUNTS[1] // 4 and len(selection.kept) == 0
    for m in range(selection.num_merged):
        cells = grid[torch.nonzero(selection.weights[m]).flatten()]
        assert len(cells) == 4 and len(set(cells[:, 0].tolist())) == 1  # one tile
        assert len({(r // 2, c // 2) for r, c in cells[:, 1:].tolist()}) == 1  # one 2x2 window


@pytest.mark.parametrize("name,options", [("uniform", {}), ("adav", {}), ("pool", {}), ("fastv", {"layer": 2})])
def test_batched_equals_per_sample(adapter, inputs, gen, name, options):
    records, alone = checks.batched_equals_per_sample(adapter, inputs, gen, plan(name, 0.4, **options), IMAGES)
    assert [adapter.tiles_per_sample(one) for one, _ in alone] == [[t] for t in TILES]
    assert [r.num_visual for _, r in alone] == COUNTS
    if name != "pool":
        assert [r.num_kept for r in records] == [-(-c * 4 // 10) for c in COUNTS]


# -- tiles, groups and the pixel shuffle -----------------------------------------------------------------------------


def test_features_groups_and_grid_per_tile(adapter, inputs):
    """The features are the model's own, tile after tile; the thumbnail (last tile) is group 0, the grid tiles 1..n;
    every tile's tokens cover its 4x4 token grid once."""
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        own = model_features(adapter, inputs)
    grid = adapter.token_grid(inputs, visual)
    for b in range(2):
        torch.testing.assert_close(visual.features[b], own[b], atol=1e-6, rtol=1e-6)
        tiles = visual.groups[b].view(TILES[b], PER_TILE)
        assert tiles[:, 0].tolist() == [*range(1, TILES[b]), 0] and bool((tiles == tiles[:, :1]).all())
        assert torch.equal(grid[b][:, 0], visual.groups[b])
        for t in range(TILES[b]):
            cells = {tuple(c) for c in grid[b][t * PER_TILE : (t + 1) * PER_TILE, 1:].tolist()}
            assert cells == {(r, c) for r in range(4) for c in range(4)}
    one = adapter.prepare([picture(40, 40)], ["What is shown?"])  # one tile, no thumbnail: the whole view, group 0
    with torch.no_grad():
        visual = adapter.visual_tokens(one)
    assert adapter.tiles_per_sample(one) == [1] and visual.groups[0].tolist() == [0] * PER_TILE


def test_pixel_shuffle_maps_follow_the_features(adapter, inputs):
    """The vectors before the projector are the tower's patch vectors that the model's pixel shuffle merged: token i's
    vector is its 2x2 source patches' concatenated (in the shuffle's channel order), the sources on the token's own
    grid cell; the projector of a token's vector is its feature."""
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        vectors, project = adapter.pre_projector(inputs, visual)
        patches = visual.vision.last_hidden_state[:, 1:]  # [tiles, 64, D]: CLS dropped
        for b in range(2):
            torch.testing.assert_close(project(vectors[b]), visual.features[b], atol=1e-5, rtol=1e-5)
    sources = adapter.patch_sources(patches.device)  # [16, 4, 2]
    grid = adapter.tile_token_grid(patches.device)
    assert sorted(tuple(s) for s in sources.flatten(0, 1).tolist()) == [(r, c) for r in range(8) for c in range(8)]
    for token in range(PER_TILE):
        r, c = grid[token].tolist()
        assert {tuple(s) for s in sources[token].tolist()} == {(2 * r + i, 2 * c + j) for i in (0, 1) for j in (0, 1)}
    dim = patches.shape[-1]
    first = 0
    for b in range(2):
        per_token = vectors[b].view(TILES[b], PER_TILE, 4, dim)
        for t in range(TILES[b]):
            for token in range(PER_TILE):
                for s, (r, c) in enumerate(sources[token].tolist()):
                    torch.testing.assert_close(per_token[t, token, s], patches[first + t, r * 8 + c])
        first += TILES[b]


def test_cls_attention_matches_eager_vision_tower(adapter, inputs):
    """The CLS query's attention to each patch in the layer producing the used features, from an eager copy of the
    tower with ``output_attentions=True``: mean over heads, CLS column dropped, per tile; then per token the mean over
    the 2x2 patches of its grid cell."""
    eager = eager_copy(adapter.model.model.vision_tower)
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        tile_scores = adapter.tile_cls_attention(visual.vision)
        scores = adapter.cls_attention(inputs, visual)
        out = eager(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layers = len(out.attentions)
    layer = adapter.model.config.vision_feature_layer % (layers + 1) - 1  # the layer producing the used features
    assert layer == layers - 1 == 2
    torch.testing.assert_close(out.last_hidden_state, visual.vision.last_hidden_state, atol=1e-5, rtol=1e-5)
    weights = out.attentions[layer]  # [tiles, H, 1 + 64, 1 + 64]
    expected = weights[:, :, 0, 1:].mean(dim=1)  # [tiles, 64]
    torch.testing.assert_close(tile_scores, expected, atol=1e-6, rtol=1e-5)
    assert expected.std() > 1e-3  # not uniform: the tiny model's CLS token and positions are not zeros
    per_patch = expected.view(-1, 8, 8)
    pooled = per_patch.view(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # 2x2 cells, row-major token grid
    grid = adapter.tile_token_grid(expected.device)
    assert torch.equal(grid[:, 0] * 4 + grid[:, 1], torch.arange(PER_TILE))  # the model's token order is row-major
    for s, e in zip(scores, torch.split(pooled, TILES)):
        torch.testing.assert_close(s, e.flatten(), atol=1e-6, rtol=1e-5)


def test_hired_takes_the_thumbnail_for_its_base_view(adapter, inputs):
    p = plan("hired", 0.5)
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        kept = p.select(adapter.signals(inputs, visual, p.strategy.needs))[0]
    for b, selection in enumerate(kept):
        k = budget(COUNTS[b], 0.5)
        base = (visual.groups[b][selection.kept] == 0).sum()
        assert len(selection.kept) == k and int(base) == min(k // 2, PER_TILE)


# -- where the tokens sit (vtprune show) -----------------------------------------------------------------------------


@pytest.mark.parametrize("size,arrangement", [((30, 70), (1, 2)), ((90, 40), (2, 1)), ((100, 100), (2, 2)),
                                               ((40, 40), (1, 1))])
def test_token_layout_tiles_assembled_thumbnail_apart(adapter, size, arrangement):
    one = adapter.prepare([picture(*size)], ["What is shown?"])
    n = adapter.tiles_per_sample(one)[0]
    cols, rows = arrangement
    assert n == (cols * rows + 1 if cols * rows > 1 else 1)
    assert adapter.tile_arrangement(one["pixel_values"]) == arrangement
    layout = adapter.token_layout(one, 0)
    width = cols * 64 + (8 + 64 if n > 1 else 0)
    assert layout.image.size == (width, rows * 64) and len(layout.boxes) == n * PER_TILE
    assert len(set(layout.boxes)) == len(layout.boxes)
    grid = adapter.tile_token_grid(one["pixel_values"].device).tolist()
    for t in range(n):
        x0, y0 = (cols * 64 + 8, 0) if n > 1 and t == n - 1 else (t % cols * 64, t // cols * 64)
        expected = [(x0 + 16 * c, y0 + 16 * r, x0 + 16 * c + 16, y0 + 16 * r + 16) for r, c in grid]
        assert layout.boxes[t * PER_TILE : (t + 1) * PER_TILE] == expected
        # the view shows that tile's pixels there
        tile = np.asarray(layout.image)[y0 : y0 + 64, x0 : x0 + 64].astype(int)
        from vtprune.models.layout import to_image

        own = np.asarray(to_image(one["pixel_values"][t], adapter.processor.image_processor)).astype(int)
        assert np.abs(tile - own).max() == 0


# -- KV cache, synthetic inputs, cost --------------------------------------------------------------------------------


def test_pre_llm_cache_holds_kept_and_text_of_longest_sample(adapter, inputs):
    checks.pre_llm_cache(adapter, inputs, [(48, 24), (80, 40)])


def test_fastv_cache_holds_full_prompt_before_k_and_kept_after(adapter, inputs):
    checks.fastv_cache(adapter, inputs, [(48, 24), (80, 40)], padded_positions)


def test_config_only_counts_match_the_processor(adapter):
    """max_visual_tokens (from the config alone) is the most the processor writes for any image."""
    from vtprune.bench.kv import num_visual_tokens

    cfg = adapter.model.config
    assert cfg.max_dynamic_patch == adapter.processor.image_processor.max_patches == 4
    assert num_visual_tokens(cfg) == adapter.num_synthetic_visual() == 80
    counts = []
    for w, h in ((40, 40), (30, 70), (90, 40), (100, 100), (400, 100), (300, 200), (1000, 1000), (20, 500)):
        one = adapter.prepare([picture(w, h)], ["q"])
        counts.append(int((one["input_ids"] == adapter.image_token_id).sum()))
    assert max(counts) == 80 and all(c % PER_TILE == 0 and c <= 80 for c in counts)


@pytest.mark.parametrize("name", ["uniform", "fastv"])
def test_synthetic_inputs_and_kv_bytes(adapter, name):
    synthetic = checks.synthetic_kv(adapter, name, 16)
    n = adapter.num_synthetic_visual()
    assert n == 80  # 4 grid tiles + the thumbnail, 16 tokens each
    assert synthetic["input_ids"].shape == (2, n + 16) and synthetic["pixel_values"].shape == (2 * 5, 3, 64, 64)


def test_load_generate_and_cost_of_the_8b_architecture(adapter):
    checks.pipeline_generates(FAMILY, IMAGES[0], COUNTS[0])
    n = 13 * 256  # 3328: 12 grid tiles + the thumbnail, (448 / 14 / 2)^2 tokens each
    by = checks.architecture_cost("internvl3-8b", FAMILY, n)
    # InternViT-300M over 13 tiles of 1025 tokens: about 2 * 0.3e9 * 1025 * 13 = 8e12, plus the projector
    assert 7e12 < by[("none", 1.0, 1)]["vision_flops"] < 1.2e13


def test_8b_geometry_on_a_narrowed_model():
    """The 8B architecture's tiles (448 px, 14 px patches, pixel shuffle 0.5) on a model narrowed to tiny widths: 256
    tokens per tile on a 16x16 grid, each from its own 2x2 patches; the processor at InternVL3's 12-tile limit writes
    at most 13 tiles."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vtprune.models.internvl import InternVLAdapter

    model, data = narrowed("internvl3-8b", InternVLConfig, InternVLForConditionalGeneration)
    adapter = InternVLAdapter(model, None)
    cfg = model.config
    assert InternVLAdapter.tokens_per_tile(cfg) == 256 and InternVLAdapter.max_visual_tokens(cfg) == 3328
    sources = adapter.patch_sources("cpu")
    grid = adapter.tile_token_grid("cpu")
    assert sources.shape == (256, 4, 2) and torch.equal(grid[:, 0] * 16 + grid[:, 1], torch.arange(256))
    assert torch.equal(sources.amin(dim=1), 2 * grid) and torch.equal(sources.amax(dim=1), 2 * grid + 1)
    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12)
    tiles = {(h, w): processor.get_number_of_image_patches(h, w, {}) for h, w in
             ((448, 448), (1344, 1792), (1000, 4000), (3000, 4000), (480, 640), (2000, 500))}
    assert max(tiles.values()) == 13 == InternVLAdapter.max_tiles(cfg) and tiles[(448, 448)] == 1
    assert tiles[(1344, 1792)] == 13  # 4 columns x 3 rows + the thumbnail
    del data["max_dynamic_patch"]  # an -hf config leaves the limit to the processor: its default, 12
    assert InternVLAdapter.max_tiles(InternVLConfig(**data)) == 13
