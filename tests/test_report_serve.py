"""``vtprune report`` on ``vtprune serve-bench`` runs (serve.jsonl): the serving section, its plot and notes."""

import json

import pandas as pd
from test_report import PNG_SIGNATURE, _invoke, _table_rows, build_results

from vtprune.results import write_json, write_jsonl

MODEL = "micro:llava"
DEVICE = "cpu (x86_64, 2 cores)"
SERVE_HEADER = ("| engine | strategy | keep ratio | visual kept | clients | prompt tokens | req/s: none → pruned | "
                "TTFT p50: none → pruned | TTFT p99: none → pruned | per-token: none → pruned | KV blocks / request | "
                "req/s ×ideal | TTFT ×ideal | req/s ×compute ideal | TTFT ×compute ideal |")
# (strategy, keep ratio, concurrency) → (req/s, TTFT p50, TTFT p99, per-token ms, prompt tokens, KV blocks / request)
FIGURES = {
    ("none", 1.0, 1): (5.0, 40.0, 80.0, 10.0, 80.0, 3),
    ("none", 1.0, 4): (16.0, 60.0, 120.0, 12.0, 80.0, 3),
    ("adav", 0.25, 1): (8.0, 25.0, 50.0, 8.0, 32.0, 2),
    ("adav", 0.25, 4): (19.2, 21.4, 60.0, 9.6, 32.0, 2),
    ("uniform", 0.5, 1): (6.0, 32.0, 64.0, None, 48.0, 2),
}
KEPT = {1.0: 64, 0.5: 32, 0.25: 16}


def serve_row(strategy, ratio, concurrency, speedups=None, rounds=3, compute=None):
    """A serve.jsonl row as ``vtprune serve-bench`` writes it; ``speedups``: column → (speed-up, lo, hi);
    ``compute``: the ideal throughput and TTFT speed-ups from the compute (runs before they were recorded: none)."""
    req, p50, p99, itl, prompt, blocks = FIGURES[(strategy, ratio, concurrency)]
    none_prompt = FIGURES[("none", 1.0, concurrency)][4]
    row = {
        "model": MODEL, "engine": "vllm", "device": DEVICE, "dtype": "float32", "strategy": strategy,
        "keep_ratio": ratio, "concurrency": concurrency, "rounds": rounds, "requests": 8, "num_visual": 64,
        "num_kept": KEPT[ratio], "req_per_s": req, "out_tok_per_s": 16 * req, "ttft_p50_ms": p50, "ttft_p99_ms": p99,
        "itl_ms": itl, "e2e_p50_ms": 200.0, "prompt_tokens": prompt, "output_tokens": 16, "kv_peak_usage": 0.01,
        "prompt_tokens_none": none_prompt, "kv_blocks_per_request": blocks, "kv_blocks_per_request_none": 3,
        "kv_peak_blocks": 12, "block_size": 32, "ideal_ttft_speedup": none_prompt / prompt,
        "ideal_throughput_speedup": (none_prompt + 16) / (prompt + 16),
    }
    if compute:
        row["ideal_compute_throughput_speedup"], row["ideal_compute_ttft_speedup"] = compute
    for column, (speedup, lo, hi) in (speedups or {}).items():
        row |= {f"{column}_speedup": speedup, f"{column}_speedup_lo": lo, f"{column}_speedup_hi": hi,
                f"{column}_noisy": rounds < 3 or hi - lo > 0.2 * speedup}
    for column, ideal in (("req_per_s", "ideal_throughput_speedup"), ("ttft_p50_ms", "ideal_ttft_speedup")):
        if column in (speedups or {}):
            row[f"{column}_efficiency"] = speedups[column][0] / row[ideal]
    return row


def serve_run_json(name):
    return {"name": name, "kind": "serve-bench", "engine": "vllm", "config": {"model": {"path": MODEL}},
            "versions": {"vtprune": "0.1.0", "vllm": "0.32.0"}, "device": DEVICE,
            "started": "2025-01-02T00:00:00+00:00", "finished": "2025-01-02T00:05:00+00:00"}


def write_serve(root, name="serve-adav"):
    """One serve-bench run: adav 0.25 at 1 and 4 clients (4: throughput noisy, TTFT above its ideal), uniform 0.5
    at 1 client from two rounds with no per-token latency."""
    rows = [
        serve_row("none", 1.0, 1), serve_row("none", 1.0, 4),
        serve_row("adav", 0.25, 1, {"req_per_s": (1.6, 1.55, 1.65), "out_tok_per_s": (1.6, 1.55, 1.65),
                                    "ttft_p50_ms": (1.6, 1.5, 1.7), "ttft_p99_ms": (1.6, 1.52, 1.68),
                                    "itl_ms": (1.25, 1.2, 1.3)}, compute=(1.78, 2.0)),
        serve_row("adav", 0.25, 4, {"req_per_s": (1.2, 0.9, 1.5), "out_tok_per_s": (1.2, 0.9, 1.5),
                                    "ttft_p50_ms": (2.8, 2.75, 2.85), "ttft_p99_ms": (2.0, 1.95, 2.05),
                                    "itl_ms": (1.25, 1.2, 1.3)}),
        serve_row("uniform", 0.5, 1, {"req_per_s": (1.2, 1.2, 1.2), "out_tok_per_s": (1.2, 1.2, 1.2),
                                      "ttft_p50_ms": (1.25, 1.25, 1.25), "ttft_p99_ms": (1.25, 1.25, 1.25)},
                  rounds=2),
    ]
    run = root / name
    write_jsonl(run / "serve.jsonl", rows)
    write_json(run / "run.json", serve_run_json(name))
    return root


def report(root, tmp_path, *extra):
    result = _invoke(root, "-o", tmp_path / "r.md", *extra)
    assert result.exit_code == 0, result.output
    return (tmp_path / "r.md").read_text(), result


def test_serving_section_cells(tmp_path):
    text, _ = report(write_serve(tmp_path / "results"), tmp_path)
    section = text.partition("## Serving under load (vLLM)")[2].partition("## Notes")[0]
    assert section.startswith("\n\n### micro:llava — cpu (x86_64, 2 cores), float32 — micro-model figures")
    assert "3, 2 paired rounds, KV blocks of 32 tokens:" not in section  # rounds listed from low to high
    assert "2, 3 paired rounds, KV blocks of 32 tokens:" in section
    assert SERVE_HEADER in section
    rows = _table_rows(section, "vllm")
    # Only pruned plans; the unpruned figures are the left side of each pair. Plans by name, then the load.
    assert [r.split(" | ")[1:5] for r in rows] == [["adav", "0.25", "16 / 64", "1"], ["adav", "0.25", "16 / 64", "4"],
                                                  ["uniform", "0.5", "32 / 64", "1"]]
    one, four, uniform = rows
    # (80 + 16) / (32 + 16) = 2.00× ideal throughput, 80 / 32 = 2.50× ideal TTFT
    assert one == ("| vllm | adav | 0.25 | 16 / 64 | 1 | 80 → 32 | 5 → 8, 1.60× (1.55–1.65) | "
                   "40 → 25 ms, 1.60× (1.50–1.70) | 80 → 50 ms, 1.60× (1.52–1.68) | 10 → 8 ms, 1.25× (1.20–1.30) | "
                   "3 → 2 | 1.60× / 2.00× (80 %) | 1.60× / 2.50× (64 %) | 1.60× / 1.78× (90 %) | "
                   "1.60× / 2.00× (80 %) |")
    # Throughput's interval ±25 %: no result, its ideal still shown; TTFT p50 2.8× of an ideal 2.5× is flagged.
    assert four == ("| vllm | adav | 0.25 | 16 / 64 | 4 | 80 → 32 | noisy (0.90–1.50×) | "
                    "60 → 21.4 ms, 2.80× (2.75–2.85) | 120 → 60 ms, 2.00× (1.95–2.05) | 12 → 9.6 ms, 1.25× (1.20–1.30) | "
                    "3 → 2 | noisy / 2.00× | 2.80× / 2.50× (112 %, above ideal) | — | — |")
    # Two rounds: a ratio without an interval; no per-token latency (itl null) reads —.
    assert uniform == ("| vllm | uniform | 0.5 | 32 / 64 | 1 | 80 → 48 | 5 → 6, 1.20× (2 rounds: no interval) | "
                       "40 → 32 ms, 1.25× (2 rounds: no interval) | 80 → 64 ms, 1.25× (2 rounds: no interval) | — | "
                       "3 → 2 | 1.20× / 1.50× (80 %) | 1.25× / 1.67× (75 %) | — | — |")
    assert "closed loop of C clients" in section and "above 1 is better" in section
    assert "![micro:llava serving](plots/serve_micro-llava-cpu-x86-64-2-cores-float32.png)" in section
    assert (tmp_path / "plots" / "serve_micro-llava-cpu-x86-64-2-cores-float32.png").read_bytes().startswith(
        PNG_SIGNATURE)


def test_serving_notes_one_line_per_kind(tmp_path):
    text, _ = report(write_serve(tmp_path / "results"), tmp_path)
    notes = text.partition("## Notes")[2].splitlines()
    assert [n for n in notes if "serving speed-ups shown as 'noisy'" in n] == [(
        "- serving speed-ups shown as 'noisy', not as results (95 % interval wider than ±10 % of the speed-up, or one "
        "round; rerun `vtprune serve-bench` with more `--rounds` or on a quieter machine): micro:llava (serving), "
        "4 clients: adav 0.25 (req/s)")]
    assert [n for n in notes if "from two rounds" in n] == [(
        "- serving speed-ups from two rounds, shown without an interval (a weak result; `vtprune serve-bench "
        "--rounds` ≥ 3): micro:llava (serving), 1 client: uniform 0.5")]
    above = [n for n in notes if "above 105 %" in n]
    assert len(above) == 1 and above[0].endswith(": micro:llava (serving), 4 clients: adav 0.25 (TTFT p50)")


def test_a_one_round_run_and_the_none_row_alone(tmp_path):
    root = tmp_path / "results"
    run = root / "one-round"
    write_jsonl(run / "serve.jsonl", [serve_row("none", 1.0, 1, rounds=1), serve_row(
        "adav", 0.25, 1, {c: (1.6, 1.6, 1.6) for c in ("req_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_ms")},
        rounds=1)])
    write_json(run / "run.json", serve_run_json("one-round"))
    run = root / "unpruned-only"
    write_jsonl(run / "serve.jsonl", [serve_row("none", 1.0, 4) | {"model": "micro:qwen2_5_vl"}])
    write_json(run / "run.json", serve_run_json("unpruned-only"))
    text, _ = report(root, tmp_path)
    assert ("| vllm | adav | 0.25 | 16 / 64 | 1 | 80 → 32 | noisy (one round) | noisy (one round) | noisy (one round) | "
            "noisy (one round) | 3 → 2 | noisy / 2.00× | noisy / 2.50× |") in text
    # A run without pruned plans shows its unpruned figures alone.
    assert "| vllm | none | 1 | 64 / 64 | 4 | 80 | 16 | 60 ms | 120 ms | 12 ms | 3 | — | — |" in text


def test_foreign_and_broken_serve_files_are_skipped_and_named(tmp_path):
    root = write_serve(tmp_path / "results")
    foreign = root / "foreign"
    write_jsonl(foreign / "serve.jsonl", [{"url": "http://x", "latency": 3}])
    write_json(foreign / "run.json", serve_run_json("foreign"))
    broken = root / "broken"
    broken.mkdir()
    (broken / "serve.jsonl").write_text('{"model": "micro:llava", "strategy": "adav"\n')
    write_json(broken / "run.json", serve_run_json("broken"))
    text_concurrency = root / "text-concurrency"
    write_jsonl(text_concurrency / "serve.jsonl", [serve_row("none", 1.0, 1) | {"concurrency": "four"}])
    write_json(text_concurrency / "run.json", serve_run_json("text-concurrency"))
    text, result = report(root, tmp_path)
    assert (f"- {foreign / 'serve.jsonl'}: row 1 has no model, strategy, keep_ratio, concurrency, device, dtype, "
            "skipped") in text
    assert f"- {broken / 'serve.jsonl'}: a line is not a JSON object, skipped" in text
    assert f"- {text_concurrency / 'serve.jsonl'}: row 1: concurrency \"four\" is not a number, skipped" in text
    assert f"note: {foreign / 'serve.jsonl'}: row 1 has no model" in result.stderr
    assert len(_table_rows(text, "vllm")) == 3  # the good run is still shown


def test_a_folder_with_a_sweep_and_a_serve_run_shows_both(tmp_path):
    root = build_results(tmp_path / "results")
    write_serve(root / "vllm")
    text, _ = report(root, tmp_path)
    assert text.index("## Accuracy") < text.index("## Speed, memory, KV cache") < text.index(
        "## Serving under load (vLLM)") < text.index("## Notes")
    speed = text.partition("## Speed, memory, KV cache")[2].partition("## Serving")[0]
    assert "Engine: `hf` (Hugging Face `generate`" in speed and "| vllm |" not in speed
    assert len(_table_rows(text, "vllm")) == 3
    assert "- dtype: float32" in text
    for name in ("speed_tiny-llava", "serve_micro-llava"):
        assert any(p.name.startswith(name) for p in (tmp_path / "plots").iterdir())

    result = _invoke(root, "--format", "csv", "-o", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    merged = pd.read_csv(tmp_path / "r.csv")
    assert set(merged["kind"]) == {"accuracy", "speed", "serve"}
    assert set(merged.loc[merged["kind"] == "speed", "engine"]) == {"hf"}
    serve = merged[merged["kind"] == "serve"].set_index(["strategy", "concurrency"])
    assert serve.loc[("adav", 4), "req_per_s_none"] == 16.0
    assert json.loads(serve.loc[("adav", 1)].to_json())["req_per_s_speedup"] == 1.6


def test_without_serve_runs_there_is_no_serving_section(tmp_path):
    text, _ = report(build_results(tmp_path / "results"), tmp_path)
    assert "Serving under load" not in text and "serve" not in text.partition("## Notes")[2]


def test_a_rerun_replaces_older_serve_points_and_pairs_with_its_own_none(tmp_path):
    root = write_serve(tmp_path / "results", "old")
    newer = root / "new"
    write_jsonl(newer / "serve.jsonl", [
        serve_row("none", 1.0, 1) | {"req_per_s": 4.0},
        serve_row("adav", 0.25, 1, {"req_per_s": (2.0, 1.95, 2.05)}),
    ])
    write_json(newer / "run.json", serve_run_json("new") | {"finished": "2025-01-03T00:00:00+00:00"})
    text, _ = report(root, tmp_path)
    one = [r for r in _table_rows(text, "vllm") if r.startswith("| vllm | adav | 0.25 | 16 / 64 | 1 |")]
    assert len(one) == 1 and "| 4 → 8, 2.00× (1.95–2.05) |" in one[0]
