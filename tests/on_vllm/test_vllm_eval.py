"""`vtprune sweep` through lmms-eval with `engine: vllm` against the same sweep on the HF engine (micro:llava):
equal answers, kept counts and scores, point by point. Runs in the vLLM environment only."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lmms_eval")

ARGS = ["sweep", "ratios", "--ratios", "0.25", "--strategies", "adav,uniform", "--limit", "4"]


def sweep(config: str, out) -> dict:
    done = subprocess.run([sys.executable, "-m", "vtprune", *ARGS, "-c", config, "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    points = {}
    for folder in sorted(p for p in out.glob("*/*") if p.is_dir()):
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        run = json.loads((folder / "run.json").read_text())
        points[folder.name] = {
            "engine": run["config"]["engine"],
            "samples": sorted((s["task"], s["doc_id"], s["output"], s["num_visual"], s["num_kept"]) for s in samples),
            "scores": sorted((m["task"], m["metric"], m["value"]) for m in metrics),
        }
    return points


def test_a_sweep_on_vllm_equals_the_same_sweep_on_hf(tmp_path):
    hf = sweep("configs/micro/micro-llava-adav.yaml", tmp_path / "hf")
    served = sweep("configs/micro/micro-llava-adav-vllm.yaml", tmp_path / "vllm")
    assert sorted(hf) == sorted(served) == ["adav-0.25", "none-1.0", "uniform-0.25"]
    for point in hf:
        assert (hf[point]["engine"], served[point]["engine"]) == ("hf", "vllm")
        assert served[point]["samples"] == hf[point]["samples"], point
        assert served[point]["scores"] == hf[point]["scores"], point
    assert {s[4] for s in served["adav-0.25"]["samples"]} == {16}  # 64 visual tokens at keep 0.25


def test_bench_is_refused_on_vllm(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vtprune", *ARGS, "--bench", "-c",
                           "configs/micro/micro-llava-adav-vllm.yaml", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --bench: times transformers' generate; engine 'vllm' is measured under load by `vtprune serve-bench` "
        "(allowed with --bench: engine hf)")
    assert not any(tmp_path.iterdir())
