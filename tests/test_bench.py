"""``run_bench`` / ``vtprune bench`` on tiny models: row fields and units, KV cache measured = analytic, interleaved
rounds, decode timed per step, paired ratios to none. No speed targets."""

import json
import random

import pytest
from typer.testing import CliRunner

import vtprune
from vtprune.api import Pipeline
from vtprune.bench import run_bench, runner, timing
from vtprune.bench.timing import paired_ratio, too_wide
from vtprune.cli import app
from vtprune.results import read_jsonl

# 8 decode steps: enough that (e2e - ttft) stands well above timer noise on a loaded CPU.
SHORT = {"batch_sizes": [1, 2], "prompt_tokens": 8, "new_tokens": 9, "warmup": 1, "repeats": 2}

ROW_KEYS = [
    "run", "model", "family", "strategy", "keep_ratio", "batch_size", "device", "dtype", "weights", "smoke", "micro",
    "prompt_tokens", "new_tokens", "repeats", "num_visual", "num_kept_mean", "kept_fraction_mean", "kept_padding",
    "ttft_ms", "ttft_ms_spread", "decode_ms_per_token", "decode_ms_per_token_spread", "e2e_ms", "e2e_ms_spread",
    "tokens_per_s", "peak_memory_bytes", "kv_self_bytes", "kv_cross_bytes", "kv_self_bytes_analytic",
    "kv_cross_bytes_analytic", "select_ms", "rounds", "interleaved", "threads",
    "ttft_ms_ratio", "ttft_ms_ratio_lo", "ttft_ms_ratio_hi", "decode_ms_per_token_ratio", "decode_ms_per_token_ratio_lo",
    "decode_ms_per_token_ratio_hi", "e2e_ms_ratio", "e2e_ms_ratio_lo", "e2e_ms_ratio_hi", "noisy",
    "ideal_ttft_speedup", "ideal_decode_speedup", "ttft_efficiency", "decode_efficiency",
]
RATIOS = ("ttft_ms", "decode_ms_per_token", "e2e_ms")


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
        assert row["family"] == "llava" and row["smoke"] is True and row["micro"] is False and row["weights"] == "pretrained"
        assert row["dtype"] == "float32" and row["device"].startswith("cpu")
        assert (row["prompt_tokens"], row["new_tokens"], row["repeats"]) == (8, 9, 2)
        for key in ("ttft_ms", "decode_ms_per_token", "e2e_ms", "tokens_per_s", "peak_memory_bytes"):
            assert row[key] > 0, key
        for key in ("ttft_ms_spread", "decode_ms_per_token_spread", "e2e_ms_spread", "select_ms"):
            assert row[key] >= 0, key
        # tokens/s is every generated token of the batch over the end-to-end time
        assert row["tokens_per_s"] == pytest.approx(row["batch_size"] * 9 / (row["e2e_ms"] / 1000))
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] > 2**20  # bytes, not KiB
        assert row["kv_cross_bytes"] == 0
        _check_kv(row)
        assert row["rounds"] == 2 and row["interleaved"] is True and isinstance(row["noisy"], bool)
        for key in RATIOS:
            assert 0 < row[f"{key}_ratio_lo"] <= row[f"{key}_ratio"] <= row[f"{key}_ratio_hi"], key
        # efficiency: the measured speed-up (1 / the paired ratio) over the ideal one
        assert row["ttft_efficiency"] == 1 / row["ttft_ms_ratio"] / row["ideal_ttft_speedup"]
        assert row["decode_efficiency"] == 1 / row["decode_ms_per_token_ratio"] / row["ideal_decode_speedup"]
    none, pruned = rows[1], rows[3]
    for key in ("ideal_ttft_speedup", "ideal_decode_speedup", "ttft_efficiency", "decode_efficiency"):
        assert none[key] == 1.0, key
    assert pruned["ideal_ttft_speedup"] > 1 and pruned["ideal_decode_speedup"] > 1
    # the ideal of the measured shape is cost's for the same input: 8 text tokens, the kept set, float32
    from vtprune.bench import cost_rows
    from vtprune.strategies import STRATEGIES

    costed, = cost_rows(llava.adapter.model.config, strategies=[(STRATEGIES.get("uniform"), {})], ratios=[0.5],
                        batch_sizes=[2], prompt_tokens=8, dtype="float32")
    assert (pruned["ideal_ttft_speedup"], pruned["ideal_decode_speedup"]) == (
        costed["ideal_ttft_speedup"], costed["ideal_decode_speedup"])
    for key in RATIOS:  # none is its own reference, round by round
        assert (none[f"{key}_ratio"], none[f"{key}_ratio_lo"], none[f"{key}_ratio_hi"]) == (1.0, 1.0, 1.0)
    assert none["noisy"] is False
    assert none["kept_fraction_mean"] == 1.0 and none["num_kept_mean"] == none["num_visual"]
    assert pruned["kept_fraction_mean"] == pytest.approx(0.5) and pruned["num_kept_mean"] == none["num_visual"] / 2
    assert pruned["kv_self_bytes"] < none["kv_self_bytes"]

    assert read_jsonl(tmp_path / "bench.jsonl") == json.loads(json.dumps(rows))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "bench" and run["smoke"] is True and run["finished"]
    assert run["weights"] == "pretrained" and run["dtype"] == "float32" and run["device"].startswith("cpu")
    assert (tmp_path / "run.json").stat().st_mtime_ns >= (tmp_path / "bench.jsonl").stat().st_mtime_ns


def test_threads_hold_for_the_measurement_and_are_restored(monkeypatch):
    import torch

    seen = []
    measure = runner.measure_visit
    monkeypatch.setattr(runner, "measure_visit", lambda pipe, inputs: seen.append(torch.get_num_threads()) or measure(pipe, inputs))
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2  # not the current count, or the test could not fail
    pipe = _pipeline("tiny:llava", threads=want, batch_sizes=[1], repeats=1, warmup=0)
    rows = run_bench(pipe, strategies=["uniform"], ratios=[0.5], progress=False)
    assert seen == [want, want] and [r["threads"] for r in rows] == [want, want]
    assert torch.get_num_threads() == before
    default = run_bench(_pipeline("tiny:llava", batch_sizes=[1], repeats=1, warmup=0), progress=False)
    assert [r["threads"] for r in default] == [before]


def test_progress_off_a_terminal_is_one_line_per_visit(capsys):
    # capsys' stderr is not a terminal, where rich draws no bar: a bench in a log must still say where it is
    pipe = _pipeline("tiny:llava", batch_sizes=[1], repeats=2, warmup=0)
    run_bench(pipe, strategies=["uniform"], ratios=[0.5], progress=True)
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("bench ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    points = [line.split(" ", 2)[2] for line in lines]
    assert sorted(points[:2]) == ["none @ 1, batch 1, round 1", "uniform @ 0.5, batch 1, round 1"]
    assert sorted(points[2:]) == ["none @ 1, batch 1, round 2", "uniform @ 0.5, batch 1, round 2"]


def test_kv_measured_equals_analytic_in_llm(llava):
    # fastv: layers[:K] cache the full prompt, layers[K:] only the kept tokens
    rows = run_bench(llava, strategies=["fastv"], ratios=[0.25], batch_sizes=[2], progress=False)
    _check_kv(rows[0])
    assert rows[0]["kept_fraction_mean"] == pytest.approx(0.25)


def test_single_new_token_has_no_decode_time():
    pipe = _pipeline("tiny:llava", new_tokens=1, warmup=0, repeats=1)
    row, = run_bench(pipe, batch_sizes=[1], progress=False)
    assert row["decode_ms_per_token"] is None and row["decode_ms_per_token_spread"] is None
    assert row["decode_ms_per_token_ratio"] is None and row["decode_ms_per_token_ratio_lo"] is None
    assert row["decode_efficiency"] is None and row["ttft_efficiency"] == 1.0
    assert row["ttft_ms_ratio"] == 1.0 and row["noisy"] is False
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

    from vtprune.bench.kv import analytic_kv_bytes, measured_kv_bytes, num_visual_tokens
    from vtprune.placement import Placement
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
                                 num_kept=n, placement=Placement("cross_attention"), element_size=4, decoded=2)
    assert measured_kv_bytes(cache, model.config) == expected
    assert expected["cross"] > 0


def test_mllama_kv():
    pipe = _pipeline("tiny:mllama", warmup=0, repeats=1)
    rows = run_bench(pipe, strategies=["none", "uniform", "trimmed_llama"], ratios=[0.5], batch_sizes=[1, 2], progress=False)
    for row in rows:
        _check_kv(row)
        assert row["kv_cross_bytes"] > 0
    # a fixed budget on like-sized images pads nothing; trimmed_llama's adaptive union varies per sample
    assert [r["kept_padding"] for r in rows if r["strategy"] != "trimmed_llama"] == [0, 0, 0, 0]
    assert all(0 <= r["kept_padding"] < 0.5 for r in rows)
    none, trimmed = rows[1], rows[-1]
    assert trimmed["kv_cross_bytes"] < none["kv_cross_bytes"]
    assert trimmed["ideal_ttft_speedup"] > 1 and trimmed["ideal_decode_speedup"] > 1


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
    assert "TTFT ms" in result.stdout and "TTFT ×ideal" in result.stdout
    assert json.loads((out / "tiny" / "run.json").read_text())["kind"] == "bench"

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


def _record_visits(monkeypatch):
    visits = []
    real = runner.measure_visit

    def measure_visit(pipe, inputs):
        visits.append((pipe.plan.strategy.name, pipe.plan.keep_ratio, inputs["input_ids"].shape[0]))
        return real(pipe, inputs)

    monkeypatch.setattr(runner, "measure_visit", measure_visit)
    return visits


def test_points_are_visited_in_shuffled_rounds(llava, monkeypatch):
    visits = _record_visits(monkeypatch)
    pipe = Pipeline(llava.config.replace(bench={**SHORT, "new_tokens": 2, "warmup": 0, "repeats": 4}), llava.adapter)
    rows = run_bench(pipe, strategies=["none", "uniform"], ratios=[0.5, 0.25], progress=False)
    points = [("none", 1.0), ("uniform", 0.5), ("uniform", 0.25)]
    expected = []
    for batch in (1, 2):  # every batch size in turn, each round visits every point once
        for round_ in range(4):
            order = list(range(3))
            random.Random(f"0:{batch}:{round_}").shuffle(order)  # config seed 0
            expected += [(*points[i], batch) for i in order]
    assert visits == expected
    rounds = [tuple(visits[i:i + 3]) for i in range(0, 12, 3)]
    assert len(set(rounds)) > 1  # the order changes between rounds
    assert [(r["strategy"], r["keep_ratio"], r["batch_size"]) for r in rows] == [(*p, b) for p in points for b in (1, 2)]


def test_none_is_measured_when_not_requested(llava, monkeypatch):
    visits = _record_visits(monkeypatch)
    rows = run_bench(llava, strategies=["uniform"], ratios=[0.5], batch_sizes=[1], progress=False)
    assert sorted(visits) == [("none", 1.0, 1)] * 2 + [("uniform", 0.5, 1)] * 2  # both, in each of 2 rounds
    assert [(r["strategy"], r["keep_ratio"]) for r in rows] == [("uniform", 0.5), ("none", 1.0)]  # none last
    assert rows[1]["ttft_ms_ratio"] == 1.0 and rows[0]["ttft_ms_ratio"] > 0


def test_decode_is_the_median_step_interval(llava, monkeypatch):
    # A fake clock per visit: TTFT call 0 → 100 s, end-to-end call 100 → 130 s, stamped after each of the 4 new
    # tokens. e2e (30 s) < TTFT (100 s): the old (e2e − ttft) / (n − 1) would be negative.
    visit = [[0, 100, 100, 110, 113, 118, 120, 130],  # steps 3, 5, 2 s → median 3
             [0, 100, 100, 105, 110, 115, 121, 130]]  # steps 5, 5, 6 s → median 5
    ticks = iter(1000 * k + t for k, stamps in enumerate(visit) for t in stamps)
    monkeypatch.setattr(timing, "now", lambda: next(ticks))
    pipe = Pipeline(llava.config.replace(bench={**SHORT, "new_tokens": 4, "warmup": 0, "repeats": 2}), llava.adapter)
    row, = run_bench(pipe, strategies=["none"], batch_sizes=[1], progress=False)
    assert next(ticks, None) is None  # every stamp was read: one per generated token
    assert (row["ttft_ms"], row["e2e_ms"]) == (100_000, 30_000)
    assert (row["e2e_ms"] - row["ttft_ms"]) / 3 < 0
    assert row["decode_ms_per_token"] == 4000  # median over rounds of 3 s and 5 s
    assert row["decode_ms_per_token_spread"] == 1000


def test_one_round_is_noisy_except_none(llava):
    pipe = Pipeline(llava.config.replace(bench={**SHORT, "new_tokens": 2, "warmup": 0, "repeats": 1}), llava.adapter)
    pruned, none = run_bench(pipe, strategies=["uniform"], ratios=[0.5], batch_sizes=[1], progress=False)
    assert pruned["noisy"] is True and pruned["rounds"] == 1  # one round: no interval to judge by
    assert pruned["ttft_ms_ratio_lo"] == pruned["ttft_ms_ratio"] == pruned["ttft_ms_ratio_hi"]
    assert none["noisy"] is False


def test_paired_ratio_and_bootstrap_interval():
    # Drift that hits both alike cancels in the paired ratio, however much the figures themselves move.
    assert paired_ratio([10, 20, 40], [20, 40, 80], seed=0) == (0.5, 0.5, 0.5)
    # Ratios 0.5 and 1.0: resampled medians are 0.5, 0.75 or 1.0 (p = 1/4, 1/2, 1/4), so the 95 % interval
    # spans both ends.
    ratio, lo, hi = paired_ratio([1, 2], [2, 2], seed=0)
    assert (ratio, lo, hi) == (0.75, 0.5, 1.0) and too_wide(ratio, lo, hi)
    # 0.60 / 0.62 are the median of a resample with p ≈ 0.32 / 0.06, far above 2.5 %: the interval is their span.
    ratio, lo, hi = paired_ratio([60, 61, 62, 61, 60], [100] * 5, seed=0)
    assert (ratio, lo, hi) == (0.61, 0.60, 0.62) and not too_wide(ratio, lo, hi)
    assert paired_ratio([3, 1, 4, 1, 5], [2, 7, 1, 8, 2], seed=7) == paired_ratio([3, 1, 4, 1, 5], [2, 7, 1, 8, 2], seed=7)
    assert not too_wide(1.0, 0.91, 1.09) and too_wide(1.0, 0.85, 1.1) and too_wide(0.5, 0.44, 0.55)
    with pytest.raises(ValueError):
        paired_ratio([1, 2], [1], seed=0)  # rounds are paired one to one
