"""``vtprune report`` on what it cannot read, on stdout, and on what it draws and marks."""

import json
import shutil
from pathlib import Path

import pytest

from test_report import (
    ONE,
    _bench,
    _invoke,
    _metric,
    _paired,
    _run_json,
    _table_rows,
    build_results,
    write_benches,
)
from vtprune.results import write_json, write_jsonl


@pytest.mark.parametrize("file,text,problem", [
    ("run.json", '{"finished": true}', "not a vtprune run.json (finished: true, not a time)"),
    ("run.json", '{"name": "x", "finished": "2025-01-01T00:01:00", "versions": "1.0"}',
     "not a vtprune run.json (versions is not an object)"),
    ("run.json", '{"name": "x", "finished": ', "not a JSON object"),
    ("run.json", b"\xff\xfe{}", "not a JSON object"),
    ("metrics.jsonl", '{"model": "tiny:llava"}\n', "row 1 has no strategy, keep_ratio, task, metric"),
    ("metrics.jsonl", '{"task": "task_a"}\n{"task": \n', "a line is not a JSON object"),
    ("bench.jsonl", json.dumps(_bench("none", 1.0, 1) | {"keep_ratio": "all"}) + "\n",
     'row 1: keep_ratio "all" is not a number'),
])
def test_a_folder_the_report_cannot_read_is_named_and_skipped(tmp_path, file, text, problem):
    root = build_results(tmp_path / "results", bench=False)
    bad = root / "zz-bad"
    write_jsonl(bad / "metrics.jsonl", [_metric("uniform", 0.5, "task_a", "exact_match", 0.123)])
    write_json(bad / "run.json", _run_json("zz-bad", "eval"))
    path = bad / file
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r.md").read_text()
    assert f"- {path}: {problem}, skipped" in report.partition("## Notes")[2]
    assert f"note: {path}: {problem}, skipped" in result.stderr
    assert "0.123" not in report and "(3 runs)" in report


def test_an_older_run_json_without_versions_is_read_and_named(tmp_path):
    root = build_results(tmp_path / "results", bench=False)
    run = json.loads((root / "eval-uniform-0.5" / "run.json").read_text())
    del run["versions"]
    write_json(root / "eval-uniform-0.5" / "run.json", run)
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r.md").read_text()
    path = root / "eval-uniform-0.5" / "run.json"
    assert f"- {path}: an older run.json without `versions`: its package versions are unknown" in report
    assert "- Versions: vtprune 0.1.0, torch 2.13.0, transformers 5.24.0, python 3.12\n" in report
    assert "| uniform | 0.5 | 0.500 | 8.0 / 16.0 | — | 0.6 (75.0%) | unscored |" in report


def test_a_report_on_stdout_writes_no_plots_unless_asked(tmp_path, monkeypatch):
    root = build_results(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    result = _invoke(root, "-o", "-")
    assert result.exit_code == 0, result.output
    assert "| uniform | 0.5 |" in result.stdout and "![" not in result.stdout
    assert not list(tmp_path.rglob("*.png"))
    result = _invoke(root, "-o", "-", "--plots-dir", tmp_path / "figs")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert "pareto_tiny-llava-task-a.png" in pngs and "speed_tiny-llava-cpu-x86-64-2-cores-float32.png" in pngs
    assert "(figs/pareto_tiny-llava-task-a.png)" in result.stdout  # linked relative to the working directory
    assert [p for p in tmp_path.iterdir() if p.name not in ("results", "figs")] == []


def test_models_are_named_without_the_machines_folders(tmp_path):
    from vtprune.report.load import CHECKOUT, model_name

    assert model_name(str(CHECKOUT / "configs" / "architectures" / "llava-1.5-7b-proxy")) == \
        "configs/architectures/llava-1.5-7b-proxy"
    assert model_name("/home/someone/models/llava-1.5-7b-hf") == "models/llava-1.5-7b-hf"
    assert model_name("~/ckpt/run3") == "ckpt/run3"
    assert model_name("micro:llava") == "micro:llava" and model_name("tiny:mllama") == "tiny:mllama"
    assert model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"

    # Rows of an older run hold the absolute path; the report, its headings and its plot files do not.
    root = tmp_path / "results"
    absolute = str(CHECKOUT / "configs" / "architectures" / "llava-1.5-7b-proxy")
    rows = [_bench(s, r, 1) | _paired(ONE, ONE, ONE) | {"model": absolute} for s, r in (("none", 1.0), ("uniform", 0.5))]
    write_jsonl(root / "b" / "bench.jsonl", rows)
    write_json(root / "b" / "run.json", _run_json("b", "bench"))
    result = _invoke(root, "-o", tmp_path / "out" / "r.md")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "r.md").read_text()
    assert "### configs/architectures/llava-1.5-7b-proxy — cpu" in report and str(CHECKOUT) not in report
    assert [p.name for p in (tmp_path / "out" / "plots").glob("*.png")] == [
        "speed_configs-architectures-llava-1.5-7b-proxy-cpu-x86-64-2-cores-float32.png"]


def test_rows_at_another_budget_than_their_keep_ratio_are_marked(tmp_path):
    # pdrop at --ratios 0.25 kept 0.023 of the tokens: not comparable with the others at 0.25
    root = build_results(tmp_path / "results", bench=False)
    pdrop = _metric("uniform", 0.25, "task_a", "exact_match", 0.7) | {
        "strategy": "pdrop", "kept_fraction_mean": 0.023, "num_kept_mean": 0.368}
    write_jsonl(root / "eval-pdrop" / "metrics.jsonl", [pdrop])
    write_json(root / "eval-pdrop" / "run.json", _run_json("eval-pdrop", "eval"))
    write_benches(root, {("uniform", 0.25, 1): _paired(ONE, ONE, ONE) | {"kept_fraction_mean": 0.21}})
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "| pdrop | 0.25 | 0.023 (target 0.25) | 0.4 / 16.0 | — | 0.7 (87.5%) | — |" in text
    # 0.21 is within 20 % of 0.25: the same budget
    assert "| uniform | 0.25 | 0.210 | 25 → 12.5 ms, 1.00× (1.00–1.00) |" in text
    assert ("- achieved kept fraction more than 20 % away from the keep ratio (not comparable with other rows at "
            "the same keep ratio): tiny:llava: pdrop 0.25\n") in text


def test_benches_at_other_thread_counts_are_separate_tables(tmp_path):
    root = tmp_path / "results"
    for name, threads in (("t1", 1), ("t2", 2)):
        rows = [_bench(s, r, 1) | _paired(ONE, ONE, ONE) | {"threads": threads} for s, r in (("none", 1.0), ("uniform", 0.5))]
        write_jsonl(root / name / "bench.jsonl", rows)
        write_json(root / name / "run.json", _run_json(name, "bench"))
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.md").read_text()
    assert "Batch size 1 (1 CPU thread):" in text and "Batch size 1 (2 CPU threads):" in text
    assert len(_table_rows(text, "uniform")) == 2


def _figures(monkeypatch):
    """Every figure the report saves: its file name → (texts written on it, legend labels)."""
    from vtprune.report import plots

    drawn = {}

    def save(fig, path, rect=(0, 0, 1, 1)):
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        drawn[Path(path).name] = ([t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle()], labels)
        plots._pyplot().close(fig)

    monkeypatch.setattr(plots, "_save", save)
    return drawn


def test_plots_draw_paired_ratios_and_name_what_they_leave_out(tmp_path, monkeypatch):
    drawn = _figures(monkeypatch)
    root = build_results(tmp_path / "results", bench=False)
    write_benches(root, {
        ("uniform", 0.5, 1): _paired((0.62, 0.60, 0.64), (0.9, 0.88, 0.93), (0.85, 0.8, 0.9)),
        ("uniform", 0.5, 2): _paired((0.7, 0.5, 0.95), (0.9, 0.88, 0.93), (0.8, 0.7, 0.9)),
        ("uniform", 0.25, 1): _paired((0.5, 0.3, 0.9), (0.6, 0.59, 0.61), (0.55, 0.54, 0.56)),
    })
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    texts, labels = drawn["speed_tiny-llava-cpu-x86-64-2-cores-float32.png"]
    assert texts == ["Left out, no result (see Notes): TTFT: uniform 0.5 batch 2, uniform 0.25 batch 1; end-to-end: "
                     "uniform 0.5 batch 2"]
    assert labels == ["uniform, batch 1", "uniform, batch 2"]
    # Pareto: one point per strategy × ratio with both an eval and a bench; uniform 0.25's TTFT is no result
    texts, labels = drawn["pareto_tiny-llava-task-a.png"]
    assert texts == ["TTFT speed-up left out, no result (see Notes): uniform 0.25 batch 1"]
    assert labels == ["none", "uniform"]
    assert "pareto_tiny-llava-task-b.png" not in drawn  # unscored everywhere: nothing to draw
    assert "(plots/pareto_tiny-llava-task-a.png)" in (tmp_path / "r.md").read_text()


def test_no_pareto_plot_without_an_eval_of_the_benched_points(tmp_path, monkeypatch):
    drawn = _figures(monkeypatch)
    root = build_results(tmp_path / "results", bench=False)
    for ratio in (0.5, 0.25):
        shutil.rmtree(root / f"eval-uniform-{ratio}")  # only the unpruned point is evaluated
    write_benches(root, {("uniform", 0.5, 1): _paired(ONE, ONE, ONE)})
    result = _invoke(root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    assert "speed_tiny-llava-cpu-x86-64-2-cores-float32.png" in drawn
    assert not [name for name in drawn if name.startswith("pareto_")]
