"""scripts/bench_gpu.sh --rehearse: every part of the GPU bench runs on the tiny models on this CPU, with the same
strategies, ratios, options and commands as on a GPU, and packs what a short GPU lease would bring back."""

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.sh"
PARTS = {  # run name: (strategies, keep ratios) as the GPU run asks for them
    "llama-3.2-11b-vision-trimmed": ({"none", "trimmed_llama"}, {0.75, 0.5, 0.25}),
    "llava-next-7b-adav": ({"none", "adav"}, {0.2222222222, 0.1111111111, 0.05}),
    "llava-1.5-7b-field": ({"none", "random", "pool", "downsample", "fastv", "pdrop", "dart", "visionzip", "vispruner",
                            "cdpruner", "fastervlm"}, {0.25}),
}
PARTS["qwen2.5-vl-7b-field"] = PARTS["llava-1.5-7b-field"]


def test_rehearsal_runs_every_part_and_packs_the_results(tmp_path):
    out, pack = tmp_path / "gpu" / "rehearsal", tmp_path / "pack"
    done = subprocess.run(["bash", str(SCRIPT), "--rehearse", "--out", str(out), "--pack", str(pack),
                           "llama", "next", "field-llava", "field-qwen", "serve"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # This environment has no vLLM: the serving part says so and the others run (tests/on_vllm rehearses it).
    assert "== part llava-1.5-7b-serve: skipped (no vLLM in python3; see --vllm-python)" in done.stdout

    with tarfile.open(pack / "gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    assert "rehearsal/REPORT.md" in names
    assert "== part qwen2.5-vl-7b-field" in (pack / "bench_gpu.log").read_text()
    for run, (strategies, ratios) in PARTS.items():
        assert {f"rehearsal/{run}/bench.jsonl", f"rehearsal/{run}/run.json", f"rehearsal/{run}-cost.json"} <= names
        rows = pd.read_json(out / run / "bench.jsonl", lines=True)
        assert set(rows.strategy) == strategies
        assert set(rows.batch_size) == {1, 2}
        assert set(rows[rows.strategy != "none"].keep_ratio) == ratios
        assert len(rows) == 2 * (1 + (len(strategies) - 1) * len(ratios))
        cost = json.loads((out / f"{run}-cost.json").read_text())
        assert {r["strategy"] for r in cost} == strategies
        assert json.loads((out / run / "run.json").read_text())["git_commit"]

    # mode budget: exactly ceil(r·N) tokens kept per sample, the count the GPU table compares at
    llama = pd.read_json(out / "llama-3.2-11b-vision-trimmed" / "bench.jsonl", lines=True)
    for row in llama[llama.strategy == "trimmed_llama"].itertuples():
        assert row.num_kept_mean == math.ceil(row.keep_ratio * row.num_visual)


def test_unknown_part_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--rehearse", "--out", str(tmp_path), "lama"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_gpu.sh: unknown argument 'lama' (allowed: --wheels DIR, --pack DIR, --out DIR, --rehearse, "
        "--vllm-python PY, llama, next, field-llava, field-qwen, serve)"]
    assert not any(tmp_path.iterdir())


def test_bench_needs_no_lmms_eval_logger(monkeypatch):
    """A GPU image without lmms-eval (so without loguru) still runs `vtprune bench`."""
    from vtprune.cli.common import quiet_libraries

    monkeypatch.setitem(sys.modules, "loguru", None)  # import loguru -> ImportError
    quiet_libraries()


def test_commit_from_the_environment_without_git(monkeypatch):
    from vtprune import results

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(results.subprocess, "run", no_git)
    monkeypatch.setenv("VTPRUNE_GIT_COMMIT", "0123abc")
    assert results.git_commit() == "0123abc"
    monkeypatch.delenv("VTPRUNE_GIT_COMMIT")
    assert results.git_commit() is None
