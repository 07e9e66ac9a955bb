"""What a sweep says off a terminal, and the bad input it refuses before any model loads."""

import re

import pytest
import yaml
from typer.testing import CliRunner

from vtprune.cli import app

CONFIG = {
    "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
    "eval": {"tasks": ["vtprune_vqav2_mini"], "generation": {"max_new_tokens": 2, "do_sample": False}},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_a_logged_sweep_prints_a_line_per_point_a_summary_and_the_report_command(config, tmp_path):
    out = tmp_path / "results"
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "0.5,0.25", "--limit", "2", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "sweep s: 3 points in this shard, 3 to run, 0 reused (tiny:llava, vtprune_vqav2_mini, limit 2)"

    def point(kept):
        return rf"vtprune_vqav2_mini exact_match \d\.\d{{3}} \(loyalty \d\.\d\d\); kept {kept}; \d+\.\d s"

    assert re.fullmatch(r"\[1/3\] none-1\.0: " + point("1.000") + r", ETA \d+\.\d s", lines[1])
    assert re.fullmatch(r"\[2/3\] uniform-0\.5: " + point("0.500") + r", ETA \d+\.\d s", lines[2])
    assert re.fullmatch(r"\[3/3\] uniform-0\.25: " + point("0.250"), lines[3])
    assert len(lines) == 4  # no blank lines, no bar remnants

    table = result.stdout.splitlines()
    assert max(len(line) for line in table[:-1]) <= 120  # the command after it is one line to copy, however long
    rows = {line.split("│")[1].strip(): line for line in table if line.startswith("│")}
    assert list(rows) == ["none-1.0", "uniform-0.5", "uniform-0.25"]
    assert "0.250" in rows["uniform-0.25"] and re.search(r"\d\.\d s", rows["uniform-0.25"])
    sweep_dir = out / "s"
    assert table[-1] == f"next: vtprune report {sweep_dir} -o {sweep_dir / 'REPORT.md'}"

    result = CliRunner().invoke(app, args)  # nothing to run: the summary still, every point reused
    assert result.exit_code == 0 and "0 to run, 3 reused" in result.stderr
    assert sum("reused" in line for line in result.stdout.splitlines() if line.startswith("│")) == 3


def test_eval_progress_total_is_known_from_the_start(tmp_path, monkeypatch):
    """Two task groups (scored, then the judge task unscored without a key): the total covers both at once."""
    from vtprune.eval import runner

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    seen = []
    monkeypatch.setattr(runner._ProgressLines, "update", lambda self, task: seen.append((task.completed, task.total)))
    config = tmp_path / "e.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "eval": {
        **CONFIG["eval"], "tasks": ["vtprune_vqav2_mini", "vtprune_llava_bench_mini"]}}))
    args = ["eval", "-c", str(config), "--limit", "2", "-o", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen and seen[-1] == (4, 4)
    assert {total for _, total in seen} == {4}


def test_progress_lines_off_a_terminal_are_spaced_out():
    import io

    from rich.console import Console

    from vtprune.eval.runner import _ProgressLines

    class Task:
        def __init__(self, completed, elapsed):
            self.completed, self.total, self.elapsed = completed, 100, elapsed

    stream = io.StringIO()
    lines = _ProgressLines(Console(file=stream, width=120), "eval p")
    for completed, elapsed in [(5, 5), (10, 8), (20, 20), (25, 25), (31, 31), (100, 90)]:
        lines.update(Task(completed, elapsed))
    # 10 % at 8 s is too soon after the start; 20 % at 20 s is due; 25 % is the same tenth; 100 %: the point's line.
    assert stream.getvalue().splitlines() == ["eval p: 20/100 requests, 20 s, ETA 80 s",
                                              "eval p: 31/100 requests, 31 s, ETA 69 s"]


@pytest.mark.parametrize("strategies, message", [
    ("adavv", "error: --strategies: unknown strategy 'adavv' (allowed: adav, "),
    ("uniform,trimmed_llama", "error: --strategies: 'trimmed_llama' needs the signal 'cross_attention'"),
])
def test_bad_strategies_name_the_option(config, tmp_path, strategies, message):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["sweep", "ratios", "-c", str(config), "--ratios", "0.5", "--strategies",
                                      strategies, "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not out.exists()


def test_a_file_where_a_point_folder_should_be_is_refused_before_loading(config, tmp_path, monkeypatch):
    import vtprune

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(vtprune, "load", no_load)
    sweep_dir = tmp_path / "results" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "uniform-0.5").write_text("not a folder")
    result = CliRunner().invoke(app, ["sweep", "ratios", "-c", str(config), "--ratios", "0.5", "-o",
                                      str(tmp_path / "results")])
    assert result.exit_code == 2
    assert result.stderr == (f"error: --output-dir: cannot write {sweep_dir / 'uniform-0.5'}: {sweep_dir / 'uniform-0.5'}"
                             " is a file, not a folder (allowed: a path in a writable folder)\n")
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["uniform-0.5"]


@pytest.mark.parametrize("content, problem", [
    (b"task: broken\ndataset_path: [unclosed\n", "while parsing a flow sequence"),
    (b"- a list\n- not a task\n", "is not a readable task YAML"),
    (b"include: missing.yaml\ntask: t\n", "No such file or directory"),
    (b"task: t\xff\n", "is not a readable task YAML"),
])
def test_a_broken_task_yaml_in_include_path_fails_before_the_model_loads(config, tmp_path, monkeypatch, content,
                                                                         problem):
    import vtprune

    monkeypatch.setattr(vtprune, "load", lambda *a, **k: pytest.fail("the model must not load"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "bad.yaml").write_bytes(content)
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--include-path", str(folder), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --include-path: {folder.resolve() / 'bad.yaml'}")
    assert problem in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


def test_an_included_task_whose_functions_do_not_import_fails_before_the_model_loads(config, tmp_path, monkeypatch):
    import vtprune

    monkeypatch.setattr(vtprune, "load", lambda *a, **k: pytest.fail("the model must not load"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text("task: my_included_task\ndataset_path: x\noutput_type: generate_until\n"
                                      "doc_to_text: !function nowhere.doc_to_text\n")
    result = CliRunner().invoke(app, ["eval", "-c", str(config), "--include-path", str(folder), "--tasks",
                                      "my_included_task", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --include-path: task 'my_included_task' in ")
    assert "nowhere" in result.stderr and result.stderr.count("\n") == 1
