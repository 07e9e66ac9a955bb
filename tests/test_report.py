import json
import math

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.results import write_json, write_jsonl

MODEL = "tiny:llava"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (strategy, keep_ratio) → score on task_a; task_b (a judge-scored task) is unscored everywhere.
SCORES = {("none", 1.0): 0.8, ("uniform", 0.5): 0.6, ("uniform", 0.25): 0.4}
KEPT = {1.0: 16, 0.5: 8, 0.25: 4}
E2E_MS = {("none", 1.0): 100.0, ("uniform", 0.5): 80.0, ("uniform", 0.25): 50.0}


def _run_json(name, kind, smoke=True):
    return {
        "name": name, "kind": kind, "config": {"model": {"path": MODEL}}, "smoke": smoke,
        "versions": {"vtprune": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0", "lmms_eval": None, "python": "3.12"},
        "device": "cpu (x86_64, 2 cores)", "dtype": "float32", "git_commit": "abc",
        "started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T00:01:00+00:00",
    }


def _metric(strategy, ratio, task, metric, value, scored=True):
    kept = KEPT[ratio]
    return {
        "run": f"{strategy}-{ratio}", "model": MODEL, "family": "llava", "strategy": strategy, "keep_ratio": ratio,
        "task": task, "metric": metric, "value": value, "stderr": None, "n": 2, "scored": scored,
        "kept_fraction_mean": kept / 16, "num_visual_mean": 16.0, "num_kept_mean": float(kept),
        "equivalent_tokens_mean": None, "smoke": True,
    }


def _bench(strategy, ratio, batch_size):
    kept = KEPT[ratio]
    e2e = E2E_MS[(strategy, ratio)] * batch_size
    return {
        "run": f"bench-{strategy}-{ratio}", "model": MODEL, "family": "llava", "strategy": strategy, "keep_ratio": ratio,
        "batch_size": batch_size, "device": "cpu (x86_64, 2 cores)", "dtype": "float32", "weights": "pretrained",
        "smoke": True, "prompt_tokens": 8, "new_tokens": 4, "repeats": 3, "num_visual": 16, "num_kept_mean": kept,
        "kept_fraction_mean": kept / 16, "ttft_ms": e2e / 4, "ttft_ms_spread": 0.1, "decode_ms_per_token": e2e / 8,
        "decode_ms_per_token_spread": 0.1, "e2e_ms": e2e, "e2e_ms_spread": 0.2, "tokens_per_s": 4000 / e2e,
        "peak_memory_bytes": 3 * 2**30, "kv_self_bytes": (24 + kept) * 2**16 * batch_size, "kv_cross_bytes": 0,
        "kv_self_bytes_analytic": (24 + kept) * 2**16 * batch_size, "kv_cross_bytes_analytic": 0, "select_ms": 0.5,
    }


def build_results(root, with_reference=True, bench=True):
    for (strategy, ratio), score in SCORES.items():
        if strategy == "none" and not with_reference:
            continue
        run = root / f"eval-{strategy}-{ratio}"
        write_jsonl(run / "metrics.jsonl", [
            _metric(strategy, ratio, "task_a", "exact_match", score),
            _metric(strategy, ratio, "task_b", "gpt_eval", None, scored=False),
        ])
        write_json(run / "run.json", _run_json(run.name, "eval"))
        if bench:  # as a sweep benches: every point beside its own unpruned one
            run = root / "nested" / f"bench-{strategy}-{ratio}"
            points = {("none", 1.0), (strategy, ratio)}
            write_jsonl(run / "bench.jsonl", [_bench(s, r, b) for s, r in sorted(points) for b in (1, 2)])
            write_json(run / "run.json", _run_json(run.name, "bench"))
    return root


def _invoke(*args):
    return CliRunner().invoke(app, ["report", *map(str, args)])


def _table_rows(text, first_cell):
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_markdown_report_tables_percentages_and_plots(tmp_path):
    root = build_results(tmp_path / "results")
    out = tmp_path / "out" / "REPORT.md"
    result = _invoke(root, "-o", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()

    assert "smoke figures: tiny random model, not accuracy claims" in text
    assert "| strategy | keep ratio | kept fraction | kept / visual | equivalent tokens | task_a | task_b |" in text
    # % of unpruned by hand: 0.6 / 0.8 = 75 %, 0.4 / 0.8 = 50 %.
    assert "| none | 1 | 1.000 | 16.0 / 16.0 | — | 0.8 (100.0%) | unscored |" in text
    assert "| uniform | 0.5 | 0.500 | 8.0 / 16.0 | — | 0.6 (75.0%) | unscored |" in text
    assert "| uniform | 0.25 | 0.250 | 4.0 / 16.0 | — | 0.4 (50.0%) | unscored |" in text
    assert "nan" not in text.lower().replace("nano", "")

    # Speed: each row against the none of its own bench (these benches predate interleaving: ratios of medians).
    # Batch 2, keep 0.5: e2e 160 / 200 = 0.80×; KV (24 + 8) · 64 KiB · 2 = 4 MiB vs (24 + 16) · 64 KiB · 2 = 5 MiB.
    half_b1, quarter_b1, half_b2, quarter_b2 = _table_rows(text, "uniform")[2:]  # after the two accuracy rows
    assert ("| 200 → 160 ms, 0.80× (medians, no interval) | 3.00 → 3.00 GiB (1.00×) | 5.00 → 4.00 MiB (0.80×) |"
            in half_b2)
    assert "| 100 → 50 ms, 0.50× (medians, no interval) | 3.00 → 3.00 GiB (1.00×) | 2.50 → 1.75 MiB (0.70×) |" in quarter_b1
    assert not [r for r in _table_rows(text, "none") if "MiB" in r]  # none is in every cell, not a row of its own
    assert text.count("Batch size 1:") == 1 and text.count("Batch size 2:") == 1

    pngs = sorted((tmp_path / "out" / "plots").glob("*.png"))
    assert {p.name.split("_")[0] for p in pngs} == {"accuracy", "speed", "pareto"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            image.verify()
        assert f"(plots/{png.name})" in text  # linked relative to the report
    assert "task_b (gpt_eval): unscored in every run" in text


def test_csv_and_json_formats_hold_the_merged_table(tmp_path):
    root = build_results(tmp_path / "results")
    result = _invoke(root, "--format", "csv", "-o", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "r.csv")
    acc = table[(table["kind"] == "accuracy") & (table["task"] == "task_a")].set_index("keep_ratio")
    assert acc.loc[0.5, "pct_of_unpruned"] == pytest.approx(75.0)
    assert acc.loc[0.25, "pct_of_unpruned"] == pytest.approx(50.0)
    unscored = table[(table["kind"] == "accuracy") & (table["task"] == "task_b")]
    assert len(unscored) == 3 and not unscored["scored"].any() and unscored["pct_of_unpruned"].isna().all()
    speed = table[table["kind"] == "speed"]
    assert len(speed) == 6
    row = speed[(speed["keep_ratio"] == 0.5) & (speed["batch_size"] == 2)].iloc[0]
    assert row["e2e_ms_ratio"] == pytest.approx(0.8) and row["kv_bytes"] == 32 * 2**16 * 2

    result = _invoke(root, "--format", "json", "-o", "-")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 6 + 6
    assert {r["kind"] for r in rows} == {"accuracy", "speed"}


def test_missing_unpruned_row_and_missing_bench_give_notes(tmp_path):
    root = build_results(tmp_path / "results", with_reference=False, bench=False)
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "| uniform | 0.5 | 0.500 | 8.0 / 16.0 | — | 0.6 | unscored |" in text
    assert "task_a (exact_match): no scored unpruned row" in text
    assert "No benchmark results." in text and "run `vtprune bench`" in text


def test_bench_without_eval(tmp_path):
    root = build_results(tmp_path / "results")
    for run in root.glob("eval-*"):
        (run / "metrics.jsonl").unlink()
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "No accuracy results." in text and "0.80×" in text


def test_no_runs_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _invoke(tmp_path / "empty")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no complete runs" in result.stderr
    result = _invoke(tmp_path / "empty", "--format", "xml")
    assert result.exit_code == 2 and "--format" in result.stderr


def test_incomplete_run_is_skipped_with_a_note(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    partial = _run_json("partial", "eval") | {"finished": None}
    write_jsonl(root / "partial" / "metrics.jsonl", [_metric("uniform", 0.5, "task_a", "exact_match", 0.1)])
    write_json(root / "partial" / "run.json", partial)
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "0.6 (75.0%)" in text
    assert f"- interrupted or still running: {root / 'partial'} — run the same command again to resume" in text


def test_zero_unpruned_score_has_no_percentage_and_says_why(tmp_path, monkeypatch):
    # A tiny random model scores 0 unpruned: % of unpruned is undefined, never a number.
    monkeypatch.setitem(SCORES, ("none", 1.0), 0.0)
    root = build_results(tmp_path / "results", bench=False)
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "| uniform | 0.5 | 0.500 | 8.0 / 16.0 | — | 0.6 | unscored |" in text
    assert "task_a (exact_match): the unpruned score is 0, so % of unpruned is undefined" in text
    assert not list((tmp_path).rglob("accuracy_*.png"))


def _paired(ttft, decode, e2e, noisy=False, rounds=5):
    """The columns of an interleaved bench: (ratio, lo, hi) per timing."""
    row = {"rounds": rounds, "interleaved": True, "noisy": noisy}
    for column, ci in (("ttft_ms", ttft), ("decode_ms_per_token", decode), ("e2e_ms", e2e)):
        row |= dict(zip((f"{column}_ratio", f"{column}_ratio_lo", f"{column}_ratio_hi"), ci))
    return row


ONE = (1.0, 1.0, 1.0)


def write_benches(root, pruned):
    """One bench run per pruned point, beside its own none: ``pruned[(strategy, ratio, batch)]`` = extra columns."""
    for strategy, ratio in {(s, r) for s, r, _ in pruned}:
        run = root / f"bench-{strategy}-{ratio}"
        rows = [_bench("none", 1.0, b) | _paired(ONE, ONE, ONE) for b in (1, 2)]
        rows += [_bench(s, r, b) | extra for (s, r, b), extra in pruned.items() if (s, r) == (strategy, ratio)]
        write_jsonl(run / "bench.jsonl", rows)
        write_json(run / "run.json", _run_json(run.name, "bench"))


def test_paired_ratios_show_their_interval_and_noisy_timings_are_no_results(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    write_benches(root, {
        ("uniform", 0.5, 1): _paired((0.62, 0.60, 0.64), (0.9, 0.88, 0.93), (0.85, 0.8, 0.9)),
        ("uniform", 0.5, 2): _paired((0.7, 0.5, 0.95), (0.9, 0.88, 0.93), (0.8, 0.7, 0.9), noisy=True),
        ("uniform", 0.25, 1): _paired((0.5, 0.5, 0.5), (0.6, 0.6, 0.6), (0.55, 0.55, 0.55), noisy=True, rounds=1),
        ("uniform", 0.25, 2): {},  # a bench from before interleaving: ratio of the medians, no interval
    })
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    half_b1, quarter_b1, half_b2, quarter_b2 = [r for r in _table_rows(text, "uniform") if "GiB" in r]
    # The measured paired ratio (0.62), not the ratio of the medians (20 / 25 = 0.80), with its interval, and the
    # medians of both points of the same bench.
    assert ("| 0.5 | 0.500 | 25 → 20 ms, 0.62× (0.60–0.64) | 12.5 → 10 ms, 0.90× (0.88–0.93) | "
            "100 → 80 ms, 0.85× (0.80–0.90) | 3.00 → 3.00 GiB (1.00×) | 2.50 → 2.00 MiB (0.80×) |") in half_b1
    # A timing whose own interval is too wide shows only that interval; the decode step, within ±10 % in the same
    # row, is a result; memory and KV cache are shown either way.
    assert ("| noisy (0.50–0.95×) | 25 → 20 ms, 0.90× (0.88–0.93) | noisy (0.70–0.90×) | 3.00 → 3.00 GiB (1.00×) | "
            "5.00 → 4.00 MiB (0.80×) |") in half_b2
    assert "| noisy (one round) | noisy (one round) | noisy (one round) | 3.00 → 3.00 GiB (1.00×) |" in quarter_b1
    assert "| 50 → 25 ms, 0.50× (medians, no interval) |" in quarter_b2
    noisy = [line for line in text.splitlines() if "timings shown as 'noisy'" in line]
    assert noisy == ["- timings shown as 'noisy', not as results (95 % interval wider than ±10 % of the ratio, or one "
                     "round; rerun with more `bench.repeats` or on a quieter machine): tiny:llava, batch 1: uniform "
                     "0.25 (TTFT, decode, e2e) — tiny:llava, batch 2: uniform 0.5 (TTFT, e2e)"]

    result = _invoke(root, "--format", "csv", "-o", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    speed = pd.read_csv(tmp_path / "r.csv").query("kind == 'speed'")
    assert speed["noisy"].sum() == 2 and speed["ttft_ms_ratio"].notna().all()


def test_speed_table_shows_measured_and_ideal_speedups(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    ideal = {"ideal_ttft_speedup": 2.05, "ideal_decode_speedup": 1.25, "kept_padding": 0.125}
    write_benches(root, {
        ("uniform", 0.5, 1): _paired((0.625, 0.62, 0.63), (0.9, 0.89, 0.91), (0.8, 0.79, 0.81)) | ideal,
        # a decode step 2× faster against an ideal of 1.25×: more than 105 % of the ideal is flagged
        ("uniform", 0.25, 1): _paired((0.5, 0.4, 0.7), (0.5, 0.49, 0.51), (0.8, 0.79, 0.81)) | ideal,
        ("uniform", 0.5, 2): _paired(ONE, ONE, ONE),  # a bench from before the ideal and the padding were recorded
    })
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "| TTFT ×ideal | decode ×ideal |" in text
    half_b1, quarter_b1, half_b2 = [r for r in _table_rows(text, "uniform") if "GiB" in r]
    # 1 / 0.625 = 1.60× of an ideal 2.05×: 78 %; decode 1 / 0.9 = 1.11× of 1.25×: 89 %
    assert half_b1.endswith("| 1.60× / 2.05× (78 %) | 1.11× / 1.25× (89 %) |")
    # TTFT noisy: no measured figure, the ideal stands; decode 1 / 0.5 = 2.00× of 1.25× = 160 %
    assert quarter_b1.endswith("| noisy / 2.05× | 2.00× / 1.25× (160 %, above ideal) |")
    assert half_b2.endswith("| — | — |")
    notes = text.partition("## Notes")[2]
    assert ("- measured speed-up above 105 % of the ideal: more than the work saved explains (a device that runs the "
            "smaller shapes faster, or a reference slowed by something else); check before quoting it: tiny:llava, "
            "batch 1: uniform 0.25 (decode)\n") in notes
    assert ("- kept counts differed per sample: share of the batch's kept-token slots that were padding, which the "
            "timings and the ideal include: tiny:llava, batch 1: uniform 0.5 12 %, uniform 0.25 12 %") in notes
    assert notes.count("padding") == 1


def test_a_two_round_ratio_is_flagged_and_a_wide_interval_is_noisy_whatever_the_row_says(tmp_path):
    # dart's e2e 0.81× (0.38–1.24) in a row the bench did not flag noisy; a two-round interval 1.24–1.24
    root = build_results(tmp_path / "results", bench=False)
    write_benches(root, {
        ("uniform", 0.5, 1): _paired((0.62, 0.60, 0.64), (0.9, 0.88, 0.93), (0.81, 0.38, 1.24), noisy=False),
        ("uniform", 0.25, 1): _paired((1.24, 1.24, 1.24), (0.9, 0.9, 0.9), (0.8, 0.8, 0.8), rounds=2),
    })
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    half, quarter = [r for r in _table_rows(text, "uniform") if "GiB" in r]
    assert "| 100 → 80 ms" not in half and "| noisy (0.38–1.24×) | 3.00 → 3.00 GiB" in half
    assert ("| 25 → 12.5 ms, 1.24× (2 rounds: no interval) | 12.5 → 6.25 ms, 0.90× (2 rounds: no interval) | "
            "100 → 50 ms, 0.80× (2 rounds: no interval) |") in quarter
    assert "1.24–1.24" not in text
    assert ("- ratios from two timed rounds, shown without an interval (a weak result; bench with `bench.repeats` ≥ "
            "3): tiny:llava, batch 1: uniform 0.25") in text
    assert "tiny:llava, batch 1: uniform 0.5 (e2e)" in text


def test_speed_tables_name_the_measurements_cpu_threads():
    from vtprune.report.tables import _threads

    assert _threads(2) == " (2 CPU threads)"
    assert _threads(1.0) == " (1 CPU thread)"
    assert _threads(float("nan")) == ""  # rows from before bench.threads
    assert _threads(None) == ""


def test_each_row_is_against_its_own_benchs_none_and_a_bench_without_one_has_no_ratios(tmp_path):
    # Bench uniform @ 0.5 one day, uniform @ 0.25 another: each run measured its own `none`, and each row's timings,
    # memory and KV ratios are against it; a run that measured no `none` gets no ratio from another run's.
    root = tmp_path / "results"
    gib = 2**30
    runs = {
        "old": ("2025-01-01T00:01:00+00:00", 1, [("none", 1.0, 4), ("uniform", 0.5, 3)]),
        "new": ("2025-01-02T00:01:00+00:00", 1, [("none", 1.0, 8), ("uniform", 0.25, 6)]),
        "lone": ("2025-01-03T00:01:00+00:00", 2, [("uniform", 0.25, 2)]),
        "other": ("2025-01-03T00:01:00+00:00", 2, [("none", 1.0, 8)]),
    }
    for name, (finished, batch, points) in runs.items():
        rows = [_bench(s, r, batch) | {"peak_memory_bytes": peak * gib} for s, r, peak in points]
        if name == "old":
            rows[0]["ttft_ms"] = 40.0  # 20 ms pruned: 0.50× of its own none, not 20 / 25 of the newer one
        write_jsonl(root / name / "bench.jsonl", rows)
        write_json(root / name / "run.json", _run_json(name, "bench") | {"finished": finished})
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    half, quarter_b1, quarter_b2 = _table_rows(text, "uniform")
    assert "| 40 → 20 ms, 0.50× (medians, no interval) |" in half and "| 4.00 → 3.00 GiB (0.75×) |" in half
    assert "| 8.00 → 6.00 GiB (0.75×) |" in quarter_b1
    assert "| 25 ms | 12.5 ms | 100 ms | 2.00 GiB | 3.50 MiB | — | — |" in quarter_b2
    assert ("- no unpruned point in the row's own bench: figures shown without ratios: tiny:llava, batch 2: uniform "
            "0.25") in text


def test_timing_status_judges_each_timing_by_its_own_interval():
    from vtprune.report.tables import timing_status

    nan = float("nan")
    assert timing_status(5, 0.7, 0.5, 0.95) == "noisy"  # 0.45 wide > ±10 % of 0.7
    # the run of llava-next-7b-proxy-b8-llm-r5: TTFT 0.742 (0.719–0.863) holds, its decode (0.64–1.01) does not
    assert timing_status(5, 0.742, 0.719, 0.863) == "ok"
    assert timing_status(5, 0.788, 0.639, 1.005) == "noisy"
    assert timing_status(1, 0.5, 0.5, 0.5) == "noisy"  # one round: no interval at all
    assert timing_status(2, 1.24, 1.24, 1.24) == "few rounds"
    assert timing_status(2, 1.24, 0.9, 1.6) == "noisy"  # too wide beats too few
    assert timing_status(3, 1.24, 1.24, 1.24) == "ok"
    assert timing_status(nan, 0.5, nan, nan) == "no interval" and timing_status(None, 0.5, None, None) == "no interval"
    assert timing_status(5, nan, nan, nan) == "missing"
    assert timing_status(nan, 0.5, 0.49, 0.51) == "ok"  # a row that does not say how many rounds: its interval


def _topk(probs):
    return {"ids": list(probs), "logprobs": [math.log(p) for p in probs.values()]}


def test_fidelity_columns_and_kl_plot_from_the_samples(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    # Unpruned: "Two" and "red"; keep 0.5: "2" (the same answer once normalised) with another first-token
    # distribution, and "blue" with the same one. Keep 0.25 has no samples file: no fidelity, not a number.
    write_jsonl(root / "eval-none-1.0" / "samples.jsonl", [
        {"task": "task_a", "doc_id": 0, "output": "Two", "first_topk": _topk({5: 0.5, 7: 0.3})},
        {"task": "task_a", "doc_id": 1, "output": "red", "first_topk": _topk({5: 0.9})},
    ])
    write_jsonl(root / "eval-uniform-0.5" / "samples.jsonl", [
        {"task": "task_a", "doc_id": 0, "output": "2", "first_topk": _topk({7: 0.5, 5: 0.25})},
        {"task": "task_a", "doc_id": 1, "output": "blue", "first_topk": _topk({5: 0.9})},
    ])
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    kl = (0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.25)) / 2
    assert "| task_a | task_b | task_a: loyalty / top-1 / KL | task_b: loyalty / top-1 / KL |" in text
    assert "| none | 1 | 1.000 | 16.0 / 16.0 | — | 0.8 (100.0%) | unscored | 1.00 / 1.00 / 0.000 | — |" in text
    assert f"| uniform | 0.5 | 0.500 | 8.0 / 16.0 | — | 0.6 (75.0%) | unscored | 0.50 / 0.50 / {kl:.3f} | — |" in text
    assert "| uniform | 0.25 | 0.250 | 4.0 / 16.0 | — | 0.4 (50.0%) | unscored | — | — |" in text
    png = tmp_path / "plots" / "kl_tiny-llava-task-a.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and f"(plots/{png.name})" in text
    assert not (tmp_path / "plots" / "kl_tiny-llava-task-b.png").exists()

    result = _invoke(root, "--format", "csv", "-o", tmp_path / "r.csv")
    table = pd.read_csv(tmp_path / "r.csv")
    row = table[(table["task"] == "task_a") & (table["keep_ratio"] == 0.5)].iloc[0]
    assert (row["loyalty"], row["top1_agreement"], row["fidelity_n"]) == (0.5, 0.5, 2)
    assert row["kl_mean"] == pytest.approx(kl)


def test_micro_models_are_labelled_micro_model_figures(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    for run in root.glob("eval-*"):
        meta = json.loads((run / "run.json").read_text())
        write_json(run / "run.json", meta | {"smoke": False, "micro": True})
        rows = [r | {"smoke": False, "micro": True, "model": "micro:llava"} for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
        write_jsonl(run / "metrics.jsonl", rows)
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "smoke figures" not in text
    assert text.count("micro-model figures") == 2  # the banner and the model's table
    assert "### micro:llava — micro-model figures" in text


def test_an_eval_on_vllm_is_its_own_row_beside_the_hf_one_against_its_own_unpruned_run(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    vllm_scores = {("none", 1.0): 0.9, ("uniform", 0.5): 0.45}  # another engine, other answers
    for (strategy, ratio), score in vllm_scores.items():
        run = root / "vllm" / f"eval-{strategy}-{ratio}"
        write_jsonl(run / "metrics.jsonl", [_metric(strategy, ratio, "task_a", "exact_match", score)])
        write_json(run / "run.json", {**_run_json(run.name, "eval"), "engine": "vllm"})
    result = _invoke(root, "-o", "-")
    assert result.exit_code == 0, result.output
    hf_rows, vllm_rows = (_table_rows(part, "uniform") for part in result.stdout.split(f"### {MODEL} (vllm)"))
    assert any("| 0.5 |" in r and "0.6 (75.0%)" in r for r in hf_rows)  # HF's own: 0.6 of 0.8
    assert [r for r in vllm_rows if "| 0.5 |" in r and "0.45 (50.0%)" in r]  # vLLM's: 0.45 of its own 0.9
