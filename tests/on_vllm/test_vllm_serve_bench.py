"""serve-bench on a real vLLM engine (micro:llava, CPU): what it measures, not how fast (no timing is asserted)."""

import pytest

pytest.importorskip("vllm")

from vtprune.config import load_config  # noqa: E402
from vtprune.eval import synth  # noqa: E402


def test_rows_count_the_pruned_prompt_the_kv_blocks_and_every_request():
    from vtprune.vllm.engine import VllmPipeline
    from vtprune.vllm.serve_bench import serve_bench

    base = VllmPipeline.start(load_config("configs/micro/micro-llava-adav.yaml"), start_engine=False)
    samples = [(s.image, s.question) for s in synth.draw_split(synth.MINI_SEED, 4, synth.KINDS)]
    lines = []
    rows = serve_bench(base, [("adav", 0.25)], samples, concurrency=(1, 3), rounds=1, warmup=0, requests_per_client=1,
                       min_requests=3, new_tokens=4, progress=lines.append)
    assert [(r["strategy"], r["concurrency"]) for r in rows] == [("none", 1), ("none", 3), ("adav", 1), ("adav", 3)]
    assert len(lines) == 4 and lines[0].startswith("round 1 c=1 ")
    none, adav = rows[0], rows[2]
    assert (none["num_visual"], none["num_kept"], adav["num_kept"]) == (64, 64, 16)
    assert none["prompt_tokens"] - adav["prompt_tokens"] == 64 - 16  # the prompt shrank by the pruned tokens
    assert adav["output_tokens"] == none["output_tokens"] == 4  # ignore_eos: every plan decodes alike
    assert (none["kv_blocks_per_request"], adav["kv_blocks_per_request"]) == (
        -(-(none["prompt_tokens"] + 4) // 32), -(-(adav["prompt_tokens"] + 4) // 32))
    assert none["kv_peak_blocks"] >= none["kv_blocks_per_request"]  # measured by the engine, at least one request's
    assert adav["rounds"] == 1 and adav["req_per_s_noisy"] and adav["requests"] == 3
    assert adav["ideal_ttft_speedup"] == none["prompt_tokens"] / adav["prompt_tokens"]


def test_the_gpu_scripts_serving_part_rehearses_on_this_cpu(tmp_path):
    """scripts/bench_gpu.sh serve --rehearse: the command a GPU lease runs, on micro:llava, with this vLLM."""
    import json
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.sh"
    out, pack = tmp_path / "gpu" / "rehearsal", tmp_path / "pack"
    # This environment's python3 for the script's own steps too (the report needs the main environment: it may fail).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script), "--rehearse", "--out", str(out), "--pack", str(pack), "--vllm-python",
                           sys.executable, "serve"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== part llava-1.5-7b-serve: " in done.stdout and "skipped" not in done.stdout
    rows = [json.loads(line) for line in (out / "llava-1.5-7b-serve" / "serve.jsonl").read_text().splitlines()]
    assert sorted({(r["strategy"], r["concurrency"]) for r in rows}) == [
        (s, c) for s in ("adav", "none", "uniform") for c in (1, 2)]
    assert {r["engine"] for r in rows} == {"vllm"}
    with tarfile.open(pack / "gpu-results.tar.gz") as tar:
        assert "rehearsal/llava-1.5-7b-serve/serve.jsonl" in tar.getnames()
