"""``vtprune cost``: analytic KV cache and prefill FLOPs of LLaMA-3.2-11B-Vision and Qwen2.5-VL-7B, checked against hand computations."""

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtprune.cli import app

REPO = Path(__file__).resolve().parents[1]
ARCH_11B = REPO / "configs/architectures/llama-3.2-11b-vision/config.json"

# The facts of meta-llama/Llama-3.2-11B-Vision that the figures depend on.
CONFIG_11B = {
    "model_type": "mllama",
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": 128256,
    "text_config": {
        "model_type": "mllama_text_model", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    },
    "vision_config": {"model_type": "mllama_vision_model", "image_size": 560, "patch_size": 14, "max_num_tiles": 4},
}

N = 4 * 1601  # 4 tiles × (40 × 40 patches + CLS)
PER_TOKEN_LAYER = 2 * 8 * 128 * 2  # K and V × 8 KV heads × head_dim 128 × 2 bytes (bf16)


@pytest.fixture
def config_11b(tmp_path):
    arch = tmp_path / "llama-3.2-11b-vision"
    arch.mkdir()
    if ARCH_11B.is_file():  # the shipped architecture file, when it exists, must give the same figures
        shutil.copy(ARCH_11B, arch / "config.json")
    else:
        (arch / "config.json").write_text(json.dumps(CONFIG_11B))
    path = tmp_path / "llama11b.yaml"
    path.write_text(
        "model: {path: llama-3.2-11b-vision, weights: random, dtype: bfloat16}\n"
        "pruning: {strategy: uniform, keep_ratio: 0.5}\n"
        "bench: {batch_sizes: [1], prompt_tokens: 64}\n"
    )
    return path


def _hf_config():
    from transformers import MllamaConfig

    return MllamaConfig(text_config=CONFIG_11B["text_config"], vision_config=CONFIG_11B["vision_config"])


def _trimmed(prune_first_layer_cache: bool):
    from vtprune.strategies import STRATEGIES

    return STRATEGIES.get("trimmed_llama"), {"prune_first_layer_cache": prune_first_layer_cache}  # placement settings


def _rows(strategy, ratios, batch_sizes):
    from vtprune.bench import cost_rows

    return cost_rows(_hf_config(), strategies=[strategy], ratios=ratios, batch_sizes=batch_sizes, prompt_tokens=64, dtype="bfloat16")


def test_trimmed_llama_kv_cache_by_hand():
    kept = math.ceil(0.5 * N)
    assert kept == 3202
    cut, = _rows(_trimmed(True), [0.5], [32])
    # every cross layer holds the kept tokens once the first layer's own cache is cut after prefill
    assert cut["num_visual"] == 6404 and cut["num_kept"] == 3202
    assert cut["kv_cross_bytes"] == 32 * 8 * 2 * 8 * 128 * 3202 * 2
    # the 32 self-attention layers hold the 64 text tokens, whatever is pruned
    assert cut["kv_self_bytes"] == 32 * 32 * 2 * 8 * 128 * 64 * 2
    kept_first, = _rows(_trimmed(False), [0.5], [32])
    assert kept_first["kv_cross_bytes"] == 32 * PER_TOKEN_LAYER * (6404 + 7 * 3202)


def test_unpruned_and_ratio_one():
    from vtprune.strategies import STRATEGIES

    none = _rows((STRATEGIES.get("none"), {}), [0.5, 0.25], [1])
    assert len(none) == 1 and none[0]["keep_ratio"] == 1.0  # nothing to vary
    assert none[0]["kv_cross_bytes"] == 8 * PER_TOKEN_LAYER * 6404
    full, = _rows(_trimmed(False), [1.0], [1])
    assert full["kv_cross_bytes"] == none[0]["kv_cross_bytes"]


def test_prefill_flops_by_hand():
    s, h, heads, kv, d, inter, vocab = 64, 4096, 32, 8, 128, 14336, 128256

    def self_layer():
        return 2 * s * h * heads * d * 2 + 2 * s * h * kv * d * 2 + 4 * s * s * heads * d + 6 * s * h * inter

    def cross_layer(m):
        return 2 * s * h * heads * d * 2 + 2 * m * h * kv * d * 2 + 4 * s * m * heads * d + 6 * s * h * inter

    # trimmed_llama scores in the first cross layer (all N tokens), the 7 later ones see 3202
    expected = 32 * self_layer() + cross_layer(6404) + 7 * cross_layer(3202) + 2 * h * vocab
    row, = _rows(_trimmed(True), [0.5], [2])
    assert row["prefill_flops"] == 2 * expected
    # placement prune_first_layer: the first cross layer, too, projects and attends to the 3202 kept only
    from vtprune.strategies import STRATEGIES

    before, = _rows((STRATEGIES.get("cls_saliency"), {"prune_first_layer": True}), [0.5], [2])
    assert before["prefill_flops"] == 2 * (32 * self_layer() + 8 * cross_layer(3202) + 2 * h * vocab)
    assert before["kv_cross_bytes"] == 2 * 8 * PER_TOKEN_LAYER * 3202


def test_mllama_baselines_prune_where_trimmed_llama_does():
    # All Mllama strategies differ only in selection: the first cross layer attends to all N in prefill and
    # every cross layer's cache is cut to the kept set, so the figures equal trimmed_llama's with its cache cut.
    from vtprune.strategies import STRATEGIES

    trimmed, = _rows(_trimmed(True), [0.5], [4])
    for name in ("random", "uniform", "cls_saliency"):
        row, = _rows((STRATEGIES.get(name), {}), [0.5], [4])
        assert (row["kv_cross_bytes"], row["prefill_flops"]) == (trimmed["kv_cross_bytes"], trimmed["prefill_flops"])


def test_cost_cli_json(config_11b):
    result = CliRunner().invoke(app, ["cost", "--config", str(config_11b), "--batch-sizes", "1,8,32",
                                      "--ratios", "1.0,0.5", "--strategies", "none,uniform", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["strategy"], r["keep_ratio"], r["batch_size"]) for r in rows] == [
        ("none", 1.0, 1), ("none", 1.0, 8), ("none", 1.0, 32),
        ("uniform", 1.0, 1), ("uniform", 1.0, 8), ("uniform", 1.0, 32),
        ("uniform", 0.5, 1), ("uniform", 0.5, 8), ("uniform", 0.5, 32),
    ]
    # uniform cuts every cross layer's cache to ceil(0.5 · 6404) tokens after prefill
    last = rows[-1]
    assert last["kv_cross_bytes"] == 32 * 8 * 2 * 8 * 128 * 3202 * 2
    assert last["kv_bytes"] == last["kv_self_bytes"] + last["kv_cross_bytes"]
    assert rows[2]["kv_cross_bytes"] == 2 * last["kv_cross_bytes"]


def test_cost_cli_table_and_errors(config_11b):
    runner = CliRunner()
    result = runner.invoke(app, ["cost", "--config", str(config_11b), "--batch-sizes", "1,32"])
    assert result.exit_code == 0, result.output
    assert "KV cross MiB" in result.stdout and "6404" in result.stdout
    # uniform @ 0.5, batch 32: 32 × 8 × 3202 × 4096 bytes = 3202 MiB
    assert "3202.00" in result.stdout
    for args, key in ((["--ratios", "0,0.5"], "--ratios"), (["--ratios", "a"], "--ratios"),
                      (["--batch-sizes", "0"], "--batch-sizes"), (["--strategies", "nope"], "--strategies")):
        bad = runner.invoke(app, ["cost", "--config", str(config_11b), *args])
        assert bad.exit_code == 2
        assert bad.stderr.strip().startswith(f"error: {key}") and len(bad.stderr.strip().splitlines()) == 1


def test_visual_token_counts_match_the_adapters():
    """The config-only counts of vtprune.bench.kv equal what the adapters' synthetic inputs produce."""
    import vtprune
    from vtprune.bench.kv import num_visual_tokens

    assert num_visual_tokens(_hf_config()) == N
    for family in ("llava", "llava_next", "qwen2_5_vl"):
        adapter = vtprune.load(model=f"tiny:{family}").adapter
        assert num_visual_tokens(adapter.model.config) == adapter.num_synthetic_visual()


def test_qwen2_5_vl_7b_by_hand():
    """The shipped Qwen2.5-VL-7B architecture: 28 layers, 4 KV heads of 128 (GQA), a 448 px image of 256 tokens."""
    config = REPO / "configs/architectures/qwen2.5-vl-7b.yaml"
    text = json.loads((REPO / "configs/architectures/qwen2.5-vl-7b/config.json").read_text())["text_config"]
    layers, kv_heads, heads, h = 28, 4, 28, 3584
    assert (text["num_hidden_layers"], text["num_key_value_heads"], text["num_attention_heads"], text["hidden_size"]) == (
        layers, kv_heads, heads, h)
    d, inter, vocab = h // heads, 18944, 152064
    per_token = 2 * layers * kv_heads * d * 2  # K and V, every layer, bf16
    assert per_token == 57344
    n = (448 // 14) ** 2 // 4  # 32 × 32 patches of 14 px, merged 2 × 2
    assert n == 256
    result = CliRunner().invoke(app, ["cost", "--config", str(config), "--batch-sizes", "1,8", "--ratios", "1.0,0.25",
                                      "--strategies", "none,adav,fastv", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["strategy"], r["keep_ratio"], r["batch_size"]): r for r in json.loads(result.stdout)}
    assert len(rows) == 10 and all(r["dtype"] == "bfloat16" and r["num_visual"] == n for r in rows.values())
    assert all(r["kv_cross_bytes"] == 0 and r["kv_bytes"] == r["kv_self_bytes"] for r in rows.values())
    for batch in (1, 8):
        assert rows["none", 1.0, batch]["kv_self_bytes"] == batch * per_token * (64 + 256)
        assert rows["adav", 1.0, batch]["kv_self_bytes"] == batch * per_token * (64 + 256)
        # adav prunes before the LLM: every layer caches the 64 kept of 256
        assert rows["adav", 0.25, batch]["num_kept"] == 64
        assert rows["adav", 0.25, batch]["kv_self_bytes"] == batch * per_token * (64 + 64)
        # fastv (K = 2): layers 0 and 1 cache all 256, the 26 others the 64 kept
        assert rows["fastv", 0.25, batch]["kv_self_bytes"] == batch * per_token // layers * (2 * 320 + 26 * 128)
    assert rows["none", 1.0, 1]["kv_self_bytes"] == 18350080  # 17.5 MiB

    def layer(s):
        return 2 * s * h * heads * d * 2 + 2 * s * h * kv_heads * d * 2 + 4 * s * s * heads * d + 6 * s * h * inter

    assert rows["none", 1.0, 8]["prefill_flops"] == 8 * (layers * layer(320) + 2 * h * vocab)
    assert rows["adav", 0.25, 1]["prefill_flops"] == layers * layer(128) + 2 * h * vocab


def _arch(name):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(REPO / "configs/architectures" / name)


def encoder_layer(tokens, h, inter, mlp=2, pairs=None):
    """One encoder layer by hand: q/k/v/o, QKᵀ + AV over ``pairs``, an MLP of ``mlp`` matrices (× 2 multiply-adds)."""
    pairs = tokens * tokens if pairs is None else pairs
    return 2 * (4 * tokens * h * h + 2 * pairs * h + mlp * tokens * h * inter)


def test_vision_flops_by_hand():
    """Vision tower + projector of one image, 2 × multiply-adds, written out per architecture."""
    from vtprune.bench.kv import vision_flops

    # LLaVA-1.5-7B, CLIP ViT-L/14-336: 576 patches + CLS, layers 1..23 of 24 feed hidden_states[-2]; the
    # projector 1024 → 4096 → 4096 over the 576 patch tokens (the CLS is dropped: select strategy "default").
    clip = 2 * 576 * (3 * 14 * 14) * 1024 + 23 * encoder_layer(577, 1024, 4096)
    llava = clip + 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert vision_flops(_arch("llava-1.5-7b")) == llava == 390_193_049_600
    # LLaVA-NeXT-7B at its largest pinpoint, 672 × 672: the base view + 2 × 2 crops, each as LLaVA-1.5.
    assert vision_flops(_arch("llava-next-7b")) == 5 * llava
    # LLaMA-3.2-11B-Vision: 4 tiles of 1600 patches + CLS, each padded to 1608 (a multiple of 8); 32 local + 8
    # global layers over the 4 · 1608 tokens together; the projector 7680 → 4096 over the 4 · 1601 real tokens.
    mllama = 2 * 4 * 1600 * (3 * 14 * 14) * 1280 + 40 * encoder_layer(4 * 1608, 1280, 5120) + 2 * 6404 * 7680 * 4096
    assert vision_flops(_arch("llama-3.2-11b-vision")) == mllama
    # Qwen2.5-VL-7B, the synthetic 32 × 32-patch image: Conv3d over 2 frames of 14 × 14 px; 4 full-attention
    # blocks (1024²  pairs), 28 window blocks: 112 px windows = 4 × 4 merged = 8 × 8 patches, 16 windows of 64
    # patches; gated MLP 1280 → 3420; merger 4 · 1280 = 5120 → 5120 → 3584 over the 256 merged tokens.
    qwen = (2 * 1024 * (3 * 2 * 14 * 14) * 1280 + 4 * encoder_layer(1024, 1280, 3420, mlp=3)
            + 28 * encoder_layer(1024, 1280, 3420, mlp=3, pairs=16 * 64 * 64) + 2 * 256 * 5120 * (5120 + 3584))
    assert vision_flops(_arch("qwen2.5-vl-7b")) == qwen
    assert [round(f / 1e12, 3) for f in (llava, 5 * llava, mllama, qwen)] == [0.390, 1.951, 19.002, 1.347]


def test_an_input_resizing_strategy_shrinks_the_vision_flops_in_the_ideal():
    """Qwen2.5-VL's downsample at 0.25 resizes the 16 × 16 merged grid to 8 × 8: the tower runs on 16 × 16 patches
    (4 windows of 64 patches), so the ideal TTFT counts that tower, not the full one; LLaVA's tower is unchanged."""
    from vtprune.bench import cost_rows
    from vtprune.bench.kv import vision_flops
    from vtprune.strategies import STRATEGIES

    qwen = _arch("qwen2.5-vl-7b")
    small = (2 * 256 * (3 * 2 * 14 * 14) * 1280 + 4 * encoder_layer(256, 1280, 3420, mlp=3)
             + 28 * encoder_layer(256, 1280, 3420, mlp=3, pairs=4 * 64 * 64) + 2 * 64 * 5120 * (5120 + 3584))
    assert vision_flops(qwen, resized_to=0.25) == small
    assert vision_flops(_arch("llava-1.5-7b"), resized_to=0.25) == vision_flops(_arch("llava-1.5-7b"))
    rows = cost_rows(qwen, strategies=[(STRATEGIES.get("downsample"), {}), (STRATEGIES.get("uniform"), {})],
                     ratios=[0.25], batch_sizes=[2], prompt_tokens=64, dtype="bfloat16")
    down, uniform = rows
    assert down["num_kept"] == uniform["num_kept"] == 64
    assert down["vision_flops"] == 2 * small and uniform["vision_flops"] == 2 * vision_flops(qwen)
    assert down["prefill_flops"] == uniform["prefill_flops"]
    full = uniform["total_prefill_flops"] * uniform["ideal_ttft_speedup"]  # none's, the same for both
    assert down["ideal_ttft_speedup"] == pytest.approx(full / (2 * small + down["prefill_flops"]), rel=1e-12)
    assert down["ideal_ttft_speedup"] > uniform["ideal_ttft_speedup"]


def _llava_rows(names, ratios, batch_sizes):
    from vtprune.bench import cost_rows
    from vtprune.strategies import STRATEGIES

    return {(r["strategy"], r["keep_ratio"], r["batch_size"]): r for r in cost_rows(
        _arch("llava-1.5-7b"), strategies=[(STRATEGIES.get(s), {}) for s in names], ratios=ratios,
        batch_sizes=batch_sizes, prompt_tokens=64, dtype="bfloat16")}


def test_ideal_ttft_speedup():
    rows = _llava_rows(["none", "adav", "fastv"], [1.0, 0.75, 0.5, 0.25], [1, 8])
    for (strategy, ratio, batch), row in rows.items():
        assert row["vision_flops"] == batch * 390_193_049_600  # the same at every keep ratio
        assert row["total_prefill_flops"] == row["vision_flops"] + row["prefill_flops"]
        none = rows["none", 1.0, batch]
        assert row["ideal_ttft_speedup"] == none["total_prefill_flops"] / row["total_prefill_flops"]
    for batch in (1, 8):
        assert rows["none", 1.0, batch]["ideal_ttft_speedup"] == rows["none", 1.0, batch]["ideal_decode_speedup"] == 1.0
        for strategy in ("adav", "fastv"):
            ideal = [rows[strategy, r, batch]["ideal_ttft_speedup"] for r in (1.0, 0.75, 0.5, 0.25)]
            assert ideal[0] == 1.0 and ideal == sorted(ideal) and len(set(ideal)) == 4  # smaller keep, larger ideal
        # fastv's first 2 layers see every visual token: less to win than pruning before the LLM
        assert rows["fastv", 0.25, batch]["ideal_ttft_speedup"] < rows["adav", 0.25, batch]["ideal_ttft_speedup"]
    assert round(rows["adav", 0.25, 1]["ideal_ttft_speedup"], 3) == 2.863
    assert round(rows["fastv", 0.25, 1]["ideal_ttft_speedup"], 3) == 2.564


def test_decode_bound_by_hand():
    rows = _llava_rows(["none", "adav"], [0.25], [8])
    # Vicuna-7B weights read every step, bf16: per layer q/k/v/o 4 · 4096² and the gated MLP 3 · 4096 · 11008,
    # 32 layers, the LM head 4096 · 32064 (the embedding table: one row per sample, left out).
    weights = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32064)
    assert weights == 13_214_679_040
    kv = 8 * 32 * 2 * 32 * 128 * 2  # batch 8 × 32 layers × K and V × 32 heads × 128 × 2 bytes, per cached token
    none, adav = rows["none", 1.0, 8], rows["adav", 0.25, 8]
    assert none["decode_bytes_per_step"] == weights + kv * (64 + 576) == weights + none["kv_bytes"]
    assert adav["decode_bytes_per_step"] == weights + kv * (64 + 144)
    assert adav["ideal_decode_speedup"] == (weights + kv * 640) / (weights + kv * 208)
    assert round(adav["ideal_decode_speedup"], 3) == 1.129  # the weights dominate: little to win at batch 8

    # LLaMA-3.2-11B-Vision: 40 layers (GQA: k/v 4096 → 8 · 128), but the 8 cross layers' k/v projections ran in
    # prefill only; decode reads their cache (8 layers · 6404 tokens, unpruned).
    from vtprune.bench.cost import decoder_weight_bytes

    weights = 2 * (40 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) - 8 * 2 * 4096 * 1024 + 4096 * 128256)
    assert decoder_weight_bytes(_hf_config(), 2) == weights
    none, = _rows(_trimmed(True), [1.0], [1])
    assert none["decode_bytes_per_step"] == weights + PER_TOKEN_LAYER * (32 * 64 + 8 * 6404)


def test_cost_cli_table_shows_the_ideal():
    config = REPO / "configs/architectures/llava-1.5-7b.yaml"
    result = CliRunner().invoke(app, ["cost", "--config", str(config), "--batch-sizes", "1", "--ratios", "0.25",
                                      "--strategies", "none,adav"])
    assert result.exit_code == 0, result.output
    for header in ("vision", "total", "TTFT ideal", "decode ideal"):
        assert header in result.stdout
    assert "2.86" in result.stdout and "0.390" in result.stdout


def test_a_strategy_with_its_own_stage_schedule_is_costed_by_it():
    from vtprune.bench.cost import stage_budgets
    from vtprune.placement import Placement
    from vtprune.strategies import STRATEGIES

    sparsevlm = STRATEGIES.get("sparsevlm")
    # SparseVLM's table for 192 of 576 tokens; PyramidDrop's rule halves what is left at each stage
    assert stage_budgets(576, 1 / 3, Placement("in_llm", layers=(3, 7, 16)), sparsevlm.schedule) == [300, 200, 110]
    assert stage_budgets(576, 0.5, Placement("in_llm", layers=(8, 16, 24))) == [288, 144, 72]
    assert stage_budgets(576, 1.0, Placement("in_llm", layers=(3, 7, 16)), sparsevlm.schedule) == [576] * 3


def test_a_strategy_inside_the_vision_tower_is_costed_on_the_smaller_tower():
    from transformers import AutoConfig

    from vtprune.bench.cost import cost_rows
    from vtprune.models import FAMILIES
    from vtprune.strategies import STRATEGIES

    hf = AutoConfig.from_pretrained(REPO / "configs/architectures/llava-1.5-7b")
    tome, uniform = (STRATEGIES.get(s) for s in ("tome", "uniform"))
    rows = cost_rows(hf, strategies=[(tome, {}), (uniform, {})], ratios=[0.25], batch_sizes=[1], prompt_tokens=64,
                     dtype="bfloat16")
    assert [r["num_kept"] for r in rows] == [144, 144]
    # the same LLM and cache; a smaller tower: 23 layers whose MLPs (and, after the first, attention) see fewer
    assert rows[0]["prefill_flops"] == rows[1]["prefill_flops"] and rows[0]["kv_bytes"] == rows[1]["kv_bytes"]
    assert rows[0]["vision_flops"] < 0.75 * rows[1]["vision_flops"]
    assert rows[0]["ideal_ttft_speedup"] > rows[1]["ideal_ttft_speedup"]
    llava = FAMILIES.get("llava")
    assert llava.merged_vision_flops(hf, 1.0, tome.schedule) == llava.vision_flops(hf)


def test_a_served_requests_flops_by_hand():
    """LLaVA-1.5-7B, one request: the vision tower whatever is kept, the kept prompt's prefill, 16 output tokens each
    through the weights (the bf16 weight bytes of test_decode_bound_by_hand, halved: elements)."""
    from vtprune.bench.cost import prefill_flops, request_flops
    from vtprune.placement import Placement

    config = _arch("llava-1.5-7b")
    none = request_flops(config, text_tokens=64, num_visual=576, num_kept=576, output_tokens=16)
    adav = request_flops(config, text_tokens=64, num_visual=576, num_kept=144, output_tokens=16)
    step = 2 * 13_214_679_040 // 2
    assert none["total"] - none["prefill"] == adav["total"] - adav["prefill"] == 16 * step
    assert none["prefill"] == 390_193_049_600 + prefill_flops(config, batch_size=1, text_tokens=64, num_visual=576,
                                                              num_kept=576, placement=Placement())
    assert none["prefill"] - adav["prefill"] == (
        prefill_flops(config, batch_size=1, text_tokens=64, num_visual=576, num_kept=576, placement=Placement())
        - prefill_flops(config, batch_size=1, text_tokens=64, num_visual=576, num_kept=144, placement=Placement()))
    # The ideal TTFT of `vtprune cost` at batch 1 is the same ratio; decode weighs the throughput ideal down.
    assert round(none["prefill"] / adav["prefill"], 3) == 2.863
    assert 1 < none["total"] / adav["total"] < none["prefill"] / adav["prefill"]
