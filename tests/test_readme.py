"""README.md's commands run as written: the main job (with a small --limit) and every example, from a folder that
holds the repository's configs and sample image, each writing only under runs/. The vLLM example needs its own environment
(tests/on_vllm covers serve-bench there); the set-up and test commands are what CI itself runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(section: str) -> list[str]:
    """The commands of the ```bash blocks under the README heading ``section``, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


MAIN_JOB = bash_blocks("The main job, on the embedded micro model")
EXAMPLES = [c for c in bash_blocks("Commands") if not c.startswith(".venv-vllm/")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    for name in ("configs", "examples"):
        (folder / name).symlink_to(REPO / name)
    return folder


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def test_the_readme_names_its_commands():
    assert len(MAIN_JOB) == 2 and MAIN_JOB[0].startswith("vtprune sweep ratios")
    assert len(EXAMPLES) >= 10 and any(c.startswith("python -m lmms_eval") for c in EXAMPLES)
    for command in MAIN_JOB + EXAMPLES:  # outputs under runs/, never in the tracked results/
        assert "results/" not in command.replace("--output_path", ""), command


def test_the_main_job_runs_as_written(workdir):
    for command in MAIN_JOB:
        # a small limit: every point still evaluates, benchmarks and reports, on 4 questions per task
        result = run(command + " --limit 4" if command.startswith("vtprune sweep") else command, workdir)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    report = (workdir / "runs/main/REPORT.md").read_text()
    assert "| adav | 0.25 |" in report and "micro-model figures" in report


def test_every_example_runs_as_written(workdir):
    for command in EXAMPLES:
        result = run(command, workdir)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert (workdir / "runs/kept.png").stat().st_size > 0
    assert (workdir / "runs/sweep/REPORT.md").is_file()
    assert list((workdir / "runs/lmms").rglob("*_results.json"))
    # everything landed under runs/: nothing beside the links and that folder
    assert sorted(p.name for p in workdir.iterdir()) == ["configs", "examples", "runs"]
