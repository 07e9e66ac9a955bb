"""``vtprune tasks export DIR`` (issue 33): the mini tasks as YAMLs that lmms-eval's own CLI runs by name."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.eval import task_export
from vtprune.eval.mini import MINI_TASKS
from vtprune.results import read_jsonl


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result, code=2):
    """The one stderr line of a failed command (no traceback)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def tree(folder: Path) -> dict:
    """Every path below ``folder`` (hidden ones included) with its bytes, to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_exported_task_runs_under_lmms_eval_cli_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's relative paths, from a folder that is not the repository
    result = invoke("tasks", "export", "runs/tasks", "--tasks", "vtprune_textvqa_mini")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "tasks"
    assert result.stdout.splitlines() == [str(folder / "vtprune_textvqa_mini.yaml")]
    data = folder / "data" / "textvqa-v3"
    assert (data / "dataset_dict.json").is_file()  # the data is copied in: the export does not need the cache

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
        "eval": {"generation": {"max_new_tokens": 3, "do_sample": False}},
    }))
    args = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", f"config={config}",
            "--include_path", "runs/tasks", "--tasks", "vtprune_textvqa_mini", "--limit", "2", "--log_samples",
            "--output_path", "runs/lmms"]
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    (samples,) = (tmp_path / "runs" / "lmms").rglob("*_samples_vtprune_textvqa_mini.jsonl")
    rows = read_jsonl(samples)
    assert len(rows) == 2
    for row in rows:
        (counts,) = row["token_counts"]
        assert (counts["num_visual"], counts["num_kept"], counts["strategy"]) == (16, 8, "uniform")
    (results,) = (tmp_path / "runs" / "lmms").rglob("*_results.json")
    results = json.loads(results.read_text())
    # lmms-eval read the exported YAML: its own index has no task of that name to win over --include_path.
    assert results["configs"]["vtprune_textvqa_mini"]["dataset_path"] == str(data)
    assert "exact_match,none" in results["results"]["vtprune_textvqa_mini"]


def test_lmms_eval_has_no_task_of_the_exported_names():
    """lmms-eval's index wins over --include_path on a clash; none of its YAMLs names a vtprune mini task."""
    import lmms_eval

    names = re.compile("|".join(MINI_TASKS))
    hits = [p for p in (Path(lmms_eval.__file__).parent / "tasks").rglob("*.yaml") if names.search(p.read_text())]
    assert hits == []


def test_every_mini_task_is_written_with_its_data_and_a_record(tmp_path):
    folder = tmp_path / "tasks"
    written = task_export.export_tasks(folder)
    assert [p.name for p in written] == [f"{name}.yaml" for name in MINI_TASKS]
    for path, name in zip(written, MINI_TASKS):
        text = path.read_text()
        assert f"task: {name}\n" in text and "include:" not in text  # the template is written into it
        (data,) = re.findall(r"^dataset_path: (.+)$", text, re.MULTILINE)
        assert Path(data).parent == folder / "data" and (Path(data) / "dataset_dict.json").is_file()
    record = json.loads((folder / task_export.RECORD).read_text())
    assert record["tasks"] == list(MINI_TASKS)
    assert sorted(p.name for p in folder.iterdir()) == record["files"]
    assert [p.name for p in tmp_path.iterdir()] == ["tasks"]  # no build folder left beside it


def test_an_earlier_export_is_replaced_as_a_whole(tmp_path):
    folder = tmp_path / "tasks"
    task_export.export_tasks(folder)
    result = invoke("tasks", "export", folder, "--tasks", "vtprune_vqav2_mini,vtprune_vqav2_mini")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["data", task_export.RECORD, "vtprune_vqav2_mini.yaml"]
    assert [p.name for p in (folder / "data").iterdir()] == ["vqav2-v3"]
    assert [p.name for p in tmp_path.iterdir()] == ["tasks"]


def test_a_failed_export_leaves_the_earlier_one(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    task_export.export_tasks(folder, ["vtprune_textvqa_mini"])
    before = tree(tmp_path)
    write = task_export._write_task

    def fail_second(name, tmp, final):
        if name == "vtprune_vqav2_mini":
            raise OSError(5, "Input/output error")
        return write(name, tmp, final)

    monkeypatch.setattr(task_export, "_write_task", fail_second)
    with pytest.raises(OSError):
        task_export.export_tasks(folder)
    assert tree(tmp_path) == before


def test_a_killed_exports_build_folder_is_removed_by_the_next(tmp_path):
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    leftover = tmp_path / f".tasks.export-{gone.stdout.strip()}@{socket.gethostname()}-abcd1234"
    (leftover / "data").mkdir(parents=True)
    other = tmp_path / ".keep"  # a hidden file export_tasks did not name: left alone
    other.write_text("x")
    task_export.export_tasks(tmp_path / "tasks", ["vtprune_vqav2_mini"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "tasks"]


def test_unknown_task_is_one_line_with_the_allowed_names(tmp_path):
    line = error_line(invoke("tasks", "export", tmp_path / "out", "--tasks", "vtprune_textvqa_mini,textvqa_val"))
    assert line == ("error: --tasks: unknown mini task 'textvqa_val' (allowed: vtprune_textvqa_mini, "
                    "vtprune_vqav2_mini, vtprune_llava_bench_mini)")
    line = error_line(invoke("tasks", "export", tmp_path / "out", "--tasks", "vtprune_textvqa_mini,,x"))
    assert line.startswith("error: --tasks: 'vtprune_textvqa_mini,,x' must be a comma-separated list")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    before = tree(tmp_path)
    line = error_line(invoke("tasks", "export", mine))
    assert line == (f"error: DIR: {mine} is not empty and is not an earlier export of `vtprune tasks export` "
                    "(allowed: a new or empty folder, or an earlier export, which is replaced)")
    assert tree(tmp_path) == before

    line = error_line(invoke("tasks", "export", mine / "notes.txt"))
    assert line.startswith(f"error: DIR: {mine / 'notes.txt'} is a file, not a folder")
    assert tree(tmp_path) == before


def test_an_earlier_export_holding_other_files_is_refused(tmp_path):
    folder = tmp_path / "tasks"
    task_export.export_tasks(folder, ["vtprune_vqav2_mini"])
    (folder / "my_task.yaml").write_text("task: mine\n")
    before = tree(tmp_path)
    line = error_line(invoke("tasks", "export", folder))
    assert line.startswith(f"error: DIR: {folder} is an earlier export but also holds my_task.yaml, which the export "
                           "did not write and would delete")
    assert tree(tmp_path) == before


def test_tasks_list_is_list_tasks():
    assert invoke("tasks", "list").stdout == invoke("list", "tasks").stdout
