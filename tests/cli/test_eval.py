"""``vtprune eval`` end to end on tiny models and the offline mini tasks, scored by lmms-eval's own task code."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.results import is_complete, read_jsonl

MINI = ["vtprune_textvqa_mini", "vtprune_vqav2_mini", "vtprune_llava_bench_mini"]
METRIC_KEYS = {
    "run", "model", "family", "strategy", "keep_ratio", "task", "metric", "value", "stderr", "n", "scored",
    "kept_fraction_mean", "num_visual_mean", "num_kept_mean", "equivalent_tokens_mean", "smoke", "micro",
    "loyalty", "top1_agreement", "kl_mean", "fidelity_n",
}
SAMPLE_KEYS = {"task", "doc_id", "output", "target", "num_visual", "num_kept", "kept_fraction", "num_merged", "kept_slots",
               "select_ms", "first_topk", "loyal", "top1_agree", "kl"}


def write_config(tmp_path, path="tiny:llava", strategy="uniform", keep_ratio=0.5, tasks=MINI, name="run1"):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "model": {"path": path}, "pruning": {"strategy": strategy, "keep_ratio": keep_ratio},
        "eval": {"tasks": tasks, "generation": {"max_new_tokens": 3, "do_sample": False}},
    }))
    return config


def mini_answers(task, doc_id):
    import datasets

    from vtprune.eval.mini import MINI_TASKS, mini_dataset_path

    doc = datasets.load_from_disk(str(mini_dataset_path(task)))[MINI_TASKS[task][1]][doc_id]
    return [a["answer"] if isinstance(a, dict) else a for a in doc["answers"]]


@pytest.fixture
def no_judge(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)


def test_eval_llava_on_the_mini_tasks(tmp_path, no_judge):
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["eval", "-c", str(write_config(tmp_path)), "--limit", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    run = out / "run1"
    assert is_complete(run)
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "eval" and meta["smoke"] is True and meta["versions"]["lmms_eval"]
    assert meta["kept_padding"] == 0  # one image size: every batch's kept sets are alike

    samples = read_jsonl(run / "samples.jsonl")
    assert [s["task"] for s in samples] == [t for t in MINI for _ in range(2)]
    for s in samples:
        assert set(s) == SAMPLE_KEYS
        assert (s["num_visual"], s["num_kept"], s["kept_fraction"], s["num_merged"], s["kept_slots"]) == (16, 8, 0.5, 0, 8)
        assert s["select_ms"] >= 0 and isinstance(s["output"], str)
    # Targets come from the generated docs in the official schema.
    assert samples[0]["target"] == mini_answers("vtprune_textvqa_mini", 0)
    assert samples[2]["target"] == mini_answers("vtprune_vqav2_mini", 0)

    rows = read_jsonl(run / "metrics.jsonl")
    for r in rows:
        assert set(r) == METRIC_KEYS
        expected = ("tiny:llava", "llava", "uniform", 0.5, 2)
        assert (r["model"], r["family"], r["strategy"], r["keep_ratio"], r["n"]) == expected
        assert r["kept_fraction_mean"] == 0.5 and r["num_visual_mean"] == 16 and r["num_kept_mean"] == 8
    by_task = {(r["task"], r["metric"]): r for r in rows}
    for task in MINI[:2]:
        row = by_task[(task, "exact_match")]
        # A random tiny model answers nonsense: lmms-eval's VQA accuracy of it is a real 0.0, not None.
        assert row["scored"] is True and row["value"] == 0.0


def test_llava_bench_without_a_judge_key_is_unscored(tmp_path, no_judge):
    out = tmp_path / "results"
    config = write_config(tmp_path, tasks=["vtprune_llava_bench_mini"])
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--limit", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "run1" / "metrics.jsonl")
    assert [r["metric"] for r in rows] == [f"gpt_eval_llava_{c}" for c in ("all", "conv", "detail", "complex")]
    assert all(r["value"] is None and r["stderr"] is None and r["scored"] is False for r in rows)
    samples = read_jsonl(out / "run1" / "samples.jsonl")
    assert len(samples) == 2 and samples[0]["target"] == "The shapes are red."


def test_failed_judge_requests_are_unscored_not_a_number(tmp_path, monkeypatch):
    # A key the judge cannot use (no network here): lmms-eval would aggregate its [-1, -1] scores to 100%.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-a-key")
    # A closed loopback port: the judge's requests fail at once and never leave this machine.
    monkeypatch.setenv("OPENAI_API_URL", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("API_TYPE", raising=False)
    out = tmp_path / "results"
    config = write_config(tmp_path, tasks=["vtprune_llava_bench_mini"])
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--limit", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "run1" / "metrics.jsonl")
    assert len(rows) == 4 and all(r["value"] is None and r["scored"] is False for r in rows)


@pytest.mark.parametrize("family", ["llava_next", "mllama"])
def test_eval_other_families(tmp_path, family, no_judge):
    out = tmp_path / "results"
    config = write_config(tmp_path, f"tiny:{family}", "none", 1.0, tasks=["vtprune_vqav2_mini"])
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--limit", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = read_jsonl(out / "run1" / "metrics.jsonl")
    assert row["family"] == family and row["value"] is not None and row["kept_fraction_mean"] == 1.0


def test_generation_errors_are_not_scored_as_empty(tmp_path, no_judge):
    import vtprune
    from vtprune.eval.runner import run_eval

    pipe = vtprune.load(write_config(tmp_path, tasks=["vtprune_vqav2_mini"]))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    pipe.generate = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        run_eval(pipe, limit=1, output_dir=tmp_path / "results", progress=False)
    assert not is_complete(tmp_path / "results" / "run1")


def test_bad_task_name_is_one_line_with_the_closest_names(tmp_path):
    out = tmp_path / "results"
    args = ["eval", "-c", str(write_config(tmp_path)), "--tasks", "textvqa_val,textvqa_vall", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tasks: unknown task 'textvqa_vall' (closest: ")
    assert "textvqa_val" in lines[0].partition("closest: ")[2]
    assert not out.exists()


def test_any_lmms_eval_task_passes_the_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["eval", "-c", str(write_config(tmp_path)), "--tasks", "mme,gqa,pope", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["eval"]["tasks"] == ["mme", "gqa", "pope"]


def test_eval_ends_with_its_score_table(tmp_path, no_judge):
    out = tmp_path / "results"
    config = write_config(tmp_path, tasks=["vtprune_vqav2_mini"])
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--limit", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "vtprune_vqav2_mini" in table and "exact_match" in table and "8.0/16.0" in table
    assert result.stdout.strip().endswith(str(out / "run1"))


def test_lmms_eval_finds_the_model_by_entry_point(tmp_path):
    from lmms_eval import models

    cls = models.get_model("vtprune")
    with pytest.raises(ValueError, match="unknown model_args \\['foo'\\]"):
        cls.create_from_arg_string(f"config={write_config(tmp_path)},foo=1")


def test_fidelity_to_the_unpruned_run_in_the_same_folder(tmp_path, no_judge):
    out, tasks = tmp_path / "results", ["vtprune_vqav2_mini"]

    def run(name, strategy, keep_ratio):
        config = write_config(tmp_path, strategy=strategy, keep_ratio=keep_ratio, tasks=tasks, name=name)
        result = CliRunner().invoke(app, ["eval", "-c", str(config), "--limit", "2", "-o", str(out)])
        assert result.exit_code == 0, result.output
        meta = json.loads((out / name / "run.json").read_text())
        return result.stdout, meta["fidelity"], read_jsonl(out / name / "metrics.jsonl"), read_jsonl(
            out / name / "samples.jsonl")

    # Before any unpruned run: said so, nothing computed.
    stdout, fidelity, (row,), samples = run("early", "uniform", 0.25)
    assert fidelity["reference"] is None and "no unpruned run" in " ".join(stdout.split())
    assert (row["loyalty"], row["kl_mean"], row["fidelity_n"]) == (None, None, 0)
    assert all(s["loyal"] is None and len(s["first_topk"]["ids"]) == 20 for s in samples)

    _, fidelity, (row,), _ = run("ref", "none", 1.0)  # its own reference
    assert fidelity["reference"] == "ref" and (row["loyalty"], row["kl_mean"], row["fidelity_n"]) == (1.0, 0.0, 2)

    _, fidelity, (row,), _ = run("all", "uniform", 1.0)
    assert fidelity["reference"] == "ref"
    assert row["loyalty"] == 1.0 and row["top1_agreement"] == 1.0 and row["kl_mean"] == pytest.approx(0, abs=1e-9)

    _, fidelity, (row,), samples = run("quarter", "uniform", 0.25)
    assert fidelity["reference"] == "ref" and row["fidelity_n"] == 2
    assert row["kl_mean"] == pytest.approx(sum(s["kl"] for s in samples) / 2) and row["kl_mean"] > 0
    assert row["loyalty"] == sum(s["loyal"] for s in samples) / 2

    # The report recomputes fidelity from the samples: the run made before its reference has it too.
    result = CliRunner().invoke(app, ["report", str(out), "-o", str(tmp_path / "R.md")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "R.md").read_text()
    quarter = f"{row['loyalty']:.2f} / {row['top1_agreement']:.2f} / {row['kl_mean']:.3f}"
    assert text.count(f"| uniform | 0.25 | 0.250 | 4.0 / 16.0 | — | 0 | {quarter} |") == 1  # early and quarter: one point
    assert "| uniform | 1 | 1.000 | 16.0 / 16.0 | — | 0 | 1.00 / 1.00 / 0.000 |" in text
    assert (tmp_path / "plots" / "kl_tiny-llava-vtprune-vqav2-mini.png").is_file()


def test_the_reference_must_share_model_generation_and_tasks(tmp_path):
    from vtprune.config import config_from_dict
    from vtprune.eval.runner import find_reference
    from vtprune.results import write_json

    def config(**over):
        return config_from_dict({"name": "x", "model": {"path": "tiny:llava"},
                                 "eval": {"generation": {"max_new_tokens": 3}}, **over})

    def reference(name, finished="2026-01-01T00:00:00", tasks=("a", "b"), kind="eval", **over):
        base = config(pruning={"strategy": "none", "keep_ratio": 1.0}, **over).to_dict()
        write_json(tmp_path / name / "run.json", {"kind": kind, "config": base, "tasks": list(tasks), "finished": finished})

    reference("other-model", model={"path": "tiny:llava_next"})
    reference("other-generation", eval={"generation": {"max_new_tokens": 4}})
    reference("other-seed", seed=5)
    reference("fewer-tasks", tasks=("a",))
    reference("bench-only", kind="bench")
    reference("unfinished", finished=None)
    assert find_reference(tmp_path, config(), ["a", "b"]) is None
    reference("old")
    reference("sweep/none-1.0", finished="2026-02-01T00:00:00")  # one level down, newer
    assert find_reference(tmp_path, config(), ["a", "b"]) == tmp_path / "sweep" / "none-1.0"
    assert find_reference(tmp_path, config(), ["a"], exclude=tmp_path / "sweep" / "none-1.0") == tmp_path / "old"
