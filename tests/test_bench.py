"""``run_bench`` / ``vtprune bench`` on tiny models: row fields and units, KV cache measured = analytic. No speed targets."""

import json

import pytest
from typer.testing import CliRunner

import vtprune
from vtprune.api import Pipeline
from vtprune.bench import run_bench
from vtprune.cli import app
from vtprune.results import read_jsonl

# 8 decode steps: enough that (e2e - ttft) stands well above timer noise on a loaded CPU.
SHORT = {"batch_sizes": [1, 2], "prompt_tokens": 8, "new_tokens": 9, "warmup": 1, "repeats": 2}

ROW_KEYS = [
    "run", "model", "family", "strategy", "keep_ratio", "batch_size", "device", "dtype", "weights", "smoke",
    "prompt_tokens", "new_tokens", "repeats", "num_visual", "num_kept_mean", "kept_fraction_mean",
    "ttft_ms", "ttft_ms_spread", "decode_ms_per_token", "decode_ms_per_token_spread", "e2e_ms", "e2e_ms_spread",
    "tokens_per_s", "peak_memory_bytes", "kv_self_bytes", "kv_cross_bytes", "kv_self_bytes_analytic",
    "kv_cross_bytes_analytic", "select_ms",
]


def _pipeline(model, **bench):
    pipe = vtprune.load(model=model)
    return Pipeline(pipe.config.replace(bench={**SHORT, **bench}), pipe.adapter)


@pytest.fixture(scope="module")
def llava():
    return _pipeline("tiny:llava")


def _check_kv(row):
    assert row["kv_self_bytes"] == row["kv_self_bytes_analytic"], row
    assert row["kv_cross_bytes"] == row["kv_cross_bytes_analytic"], row


def test_rows_fields_and_units(llava, tmp_path):
    rows = run_bench(llava, strategies=["none", "uniform"], ratios=[0.5], output_dir=tmp_path, progress=False)
    assert [(r["strategy"], r["keep_ratio"], r["batch_size"]) for r in rows] == [
        ("none", 1.0, 1), ("none", 1.0, 2), ("uniform", 0.5, 1), ("uniform", 0.5, 2)]
    for row in rows:
        assert list(row) == ROW_KEYS
        assert row["family"] == "llava" and row["smoke"] is True and row["weights"] == "pretrained"
        assert row["dtype"] == "float32" and row["device"].startswith("cpu")
        assert (row["prompt_tokens"], row["new_tokens"], row["repeats"]) == (8, 9, 2)
        for key in ("ttft_ms", "decode_ms_per_token", "e2e_ms", "tokens_per_s", "peak_memory_bytes"):
            assert row[key] > 0, key
        for key in ("ttft_ms_spread", "decode_ms_per_token_spread", "e2e_ms_spread", "select_ms"):
            assert row[key] >= 0, key
        assert row["e2e_ms"] > row["ttft_ms"]  # nine tokens take longer than one
        # tokens/s is every generated token of the batch over the end-to-end time
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 9 / (row["e2e_ms"] / 1000))
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] > 2**20  # bytes, not KiB
        assert row["kv_cross_bytes"] == 0
        _check_kv(row)
    none, pruned = rows[1], rows[3]
    assert none["kept_fraction_mean"] == 1.0 and none["num_kept_mean"] == none["num_visual"]
    assert pruned["kept_fraction_mean"] == pytest.approx(0.5) and pruned["num_kept_mean"] == none["num_visual"] / 2
    assert pruned["kv_self_bytes"] < none["kv_self_bytes"]

    assert read_jsonl(tmp_path / "bench.jsonl") == json.loads(json.dumps(rows))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "bench" and run["smoke"] is True and run["finished"]
    assert run["weights"] == "pretrained" and run["dtype"] == "float32" and run["device"].startswith("cpu")
    assert (tmp_path / "run.json").stat().st_mtime_ns >= (tmp_path / "bench.jsonl").stat().st_mtime_ns


def test_kv_measured_equals_analytic_in_llm(llava):
    # fastv: layers[:K] cache the full prompt, layers[K:] only the kept tokens
    rows = run_bench(llava, strategies=["fastv"], ratios=[0.25], batch_sizes=[2], progress=False)
    _check_kv(rows[0])
    assert rows[0]["kept_fraction_mean"] == pytest.approx(0.25)


def test_single_new_token_has_no_decode_time():
    pipe = _pipeline("tiny:llava", new_tokens=1, warmup=0, repeats=1)
    row, = run_bench(pipe, batch_sizes=[1], progress=False)
    assert row["decode_ms_per_token"] is None and row["decode_ms_per_token_spread"] is None
    assert row["e2e_ms_spread"] == 0.0
    _check_kv(row)


def test_llava_next_kv():
    pipe = _pipeline("tiny:llava_next", warmup=0, repeats=1)
    for row in run_bench(pipe, strategies=["none", "uniform"], ratios=[0.5], batch_sizes=[2], progress=False):
        _check_kv(row)


def test_mllama_kv_accounting_from_the_model_itself():
    """The cache split (self vs cross layers) on the transformers model, without a vtprune adapter."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, DynamicCache, MllamaForConditionalGeneration

    from vtprune.bench.kv import Layout, analytic_kv_bytes, measured_kv_bytes, num_visual_tokens
    from vtprune.models.tiny import tiny_path

    path = tiny_path("mllama")
    model = MllamaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}], add_generation_prompt=True)
    inputs = processor(text=[text, text], images=[[Image.new("RGB", (64, 64))], [Image.new("RGB", (64, 32))]],
                       padding=True, return_tensors="pt")
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache=cache)
    n = num_visual_tokens(model.config)  # every tile, empty ones included, is in the cross cache
    expected = analytic_kv_bytes(model.config, batch_size=2, text_tokens=inputs["input_ids"].shape[1], num_visual=n,
                                 num_kept=n, layout=Layout(), element_size=4, decoded=2)
    assert measured_kv_bytes(cache, model.config) == expected
    assert expected["cross"] > 0


def test_mllama_kv():
    pipe = _pipeline("tiny:mllama", warmup=0, repeats=1)
    rows = run_bench(pipe, strategies=["none", "uniform", "trimmed_llama"], ratios=[0.5], batch_sizes=[1, 2], progress=False)
    for row in rows:
        _check_kv(row)
        assert row["kv_cross_bytes"] > 0
    none, trimmed = rows[1], rows[-1]
    assert trimmed["kv_cross_bytes"] < none["kv_cross_bytes"]


def test_cli_bench(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {path: 'tiny:llava'}\npruning: {strategy: uniform, keep_ratio: 0.5}\n"
        "bench: {prompt_tokens: 8, new_tokens: 2, warmup: 0, repeats: 1}\n"
    )
    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(app, ["bench", "--config", str(config), "--batch-sizes", "1", "--ratios", "1.0,0.5",
                                 "--strategies", "none,uniform", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "tiny" / "bench.jsonl")
    assert [(r["strategy"], r["keep_ratio"]) for r in rows] == [("none", 1.0), ("uniform", 1.0), ("uniform", 0.5)]
    assert "TTFT ms" in result.stdout and json.loads((out / "tiny" / "run.json").read_text())["kind"] == "bench"

    for args, key in ((["--ratios", "1.5"], "--ratios"), (["--batch-sizes", "x"], "--batch-sizes"),
                      (["--strategies", "nope"], "--strategies"), (["--strategies", "trimmed_llama"], "--strategies")):
        bad_out = tmp_path / "bad"
        bad = runner.invoke(app, ["bench", "--config", str(config), "--output-dir", str(bad_out), *args])
        if "trimmed_llama" in args:
            assert bad.exit_code == 2 and bad.stderr.startswith("error: pruning.strategy")  # not a llava strategy
        else:
            assert bad.exit_code == 2 and bad.stderr.startswith(f"error: {key}"), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not bad_out.exists()


def test_qwen2_5_vl_kv():
    # One flat pixel tensor for the batch, M-RoPE positions: the cache still holds exactly the kept tokens,
    # before the LLM (uniform) and from layer K on (fastv).
    pipe = _pipeline("tiny:qwen2_5_vl", warmup=0, repeats=1, new_tokens=3)
    rows = run_bench(pipe, strategies=["none", "uniform", "fastv"], ratios=[0.5], batch_sizes=[2], progress=False)
    assert [r["num_visual"] for r in rows] == [256] * 3  # the synthetic 256 px image: 32 × 32 patches merged 2 × 2
    for row in rows:
        _check_kv(row)
        assert row["kv_cross_bytes"] == 0
    none, uniform, fastv = rows
    assert uniform["num_kept_mean"] == fastv["num_kept_mean"] == 128
    assert uniform["kv_self_bytes"] < fastv["kv_self_bytes"] < none["kv_self_bytes"]
