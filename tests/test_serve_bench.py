"""serve-bench's figures from hand-made visits (no vLLM needed), and its bad input."""

import pytest
from PIL import Image
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.vllm.serve_bench import _row, percentile

def micro_config():
    from transformers import AutoConfig

    from vtprune.models import resolve_path

    return AutoConfig.from_pretrained(resolve_path("micro:llava"))


COUNTS = {"num_visual": 64, "requests_per_visit": {4: 8}, "text_tokens": 14, "hf_config": micro_config()}


def visit(req_per_s, ttft, prompt, itl=5.0):
    return {"req_per_s": req_per_s, "out_tok_per_s": 16 * req_per_s, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft,
            "itl_ms": itl, "e2e_p50_ms": 100.0, "prompt_tokens": prompt, "output_tokens": 16, "kv_peak_usage": 0.25}


def test_percentile_interpolates_between_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4, 5], 99) == pytest.approx(4.96)
    assert percentile([7], 99) == 7


def test_a_pruned_row_is_paired_round_by_round_to_the_unpruned_visits():
    none = [visit(10, 40, 78), visit(20, 20, 78), visit(10, 40, 78)]
    adav = [visit(15, 20, 30), visit(30, 10, 30), visit(15, 20, 30)]  # 1.5x throughput, 2x TTFT in every round
    visits = {(("none", 1.0), 4): none, (("adav", 0.25), 4): adav}
    row = _row(("adav", 0.25), 4, visits, blocks=100, block_size=32, seed=0, counts=COUNTS)
    assert (row["num_visual"], row["num_kept"], row["requests"], row["rounds"]) == (64, 16, 8, 3)
    assert row["req_per_s"] == 15 and row["prompt_tokens_none"] == 78
    assert (row["req_per_s_speedup"], row["req_per_s_speedup_lo"], row["req_per_s_speedup_hi"]) == (1.5, 1.5, 1.5)
    assert row["ttft_p50_ms_speedup"] == 2.0 and row["itl_ms_speedup"] == 1.0
    assert row["ideal_ttft_speedup"] == 78 / 30
    assert row["ideal_throughput_speedup"] == (78 + 16) / (30 + 16)
    assert row["req_per_s_efficiency"] == pytest.approx(1.5 / ((78 + 16) / (30 + 16)))
    from vtprune.bench.cost import request_flops

    flops = [request_flops(micro_config(), text_tokens=14, num_visual=64, num_kept=k, output_tokens=16) for k in (64, 16)]
    assert row["ideal_compute_ttft_speedup"] == flops[0]["prefill"] / flops[1]["prefill"]
    assert row["ideal_compute_throughput_speedup"] == flops[0]["total"] / flops[1]["total"]
    assert row["req_per_s_compute_efficiency"] == 1.5 / row["ideal_compute_throughput_speedup"]
    # The vision tower runs whatever is pruned after it: less to win than the token counts say.
    assert 1 < row["ideal_compute_throughput_speedup"] < row["ideal_throughput_speedup"]
    assert (row["kv_blocks_per_request"], row["kv_blocks_per_request_none"], row["kv_peak_blocks"]) == (2, 3, 25)
    assert row["req_per_s_noisy"] is False


def test_the_unpruned_row_has_no_ratios_and_two_rounds_are_flagged():
    visits = {(("none", 1.0), 4): [visit(10, 40, 78)] * 2, (("uniform", 0.5), 4): [visit(11, 30, 46)] * 2}
    none = _row(("none", 1.0), 4, visits, blocks=100, block_size=32, seed=0, counts=COUNTS)
    measured = ("req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_ms")
    assert none["num_kept"] == 64 and not any(f"{c}_speedup" in none for c in measured)
    pruned = _row(("uniform", 0.5), 4, visits, blocks=100, block_size=32, seed=0, counts=COUNTS)
    assert pruned["num_kept"] == 32 and pruned["req_per_s_noisy"] is True  # an interval needs 3 rounds


def test_a_missing_per_token_latency_leaves_its_ratio_out():
    visits = {(("none", 1.0), 4): [visit(10, 40, 78, itl=None)] * 3, (("adav", 0.25), 4): [visit(12, 30, 30)] * 3}
    row = _row(("adav", 0.25), 4, visits, blocks=100, block_size=32, seed=0, counts=COUNTS)
    assert "itl_ms_speedup" not in row and row["req_per_s_speedup"] == pytest.approx(1.2)


@pytest.mark.parametrize("args, line", [
    (["--concurrency", "0,4"], "--concurrency: '0,4' must list positive integers"),
    (["--concurrency", "4,,16"], "--concurrency:"),
    (["--rounds", "0"], "--rounds: 0 is not allowed (allowed: an integer >= 1)"),
    (["--strategies", "adavv"], "--strategies: unknown strategy 'adavv'"),
    (["--ratios", "1.5"], "--ratios: 1.5 is outside the allowed range (0, 1]"),
])
def test_bad_input_is_one_line(args, line):
    result = CliRunner().invoke(app, ["serve-bench", "-c", "configs/micro/micro-llava-adav.yaml", *args])
    assert result.exit_code == 2 and line in result.output


def test_without_vllm_the_command_says_where_it_runs():
    pytest.importorskip("lmms_eval")  # the main environment, which has no vLLM
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["serve-bench", "-c", "configs/micro/micro-llava-adav.yaml"])
    assert result.exit_code == 2
    assert "engine: 'vllm' needs vLLM, which lives in its own environment: run `bash scripts/install-vllm.sh`" in result.output


def test_a_random_weights_architecture_is_served_with_the_micro_models_tokenizer(tmp_path, monkeypatch):
    """`weights: random` on vLLM: the architecture's config beside a tokenizer and a processor sized to its tower."""
    import json

    from transformers import AutoProcessor

    from vtprune.config import load_config
    from vtprune.errors import ConfigError
    from vtprune.models import resolve_path
    from vtprune.vllm.engine import random_weights_dir

    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    arch = resolve_path(load_config("configs/architectures/llava-1.5-7b-proxy.yaml").model.path)
    served = random_weights_dir(arch, "llava")
    assert served.parent == tmp_path / "served" and served == random_weights_dir(arch, "llava")  # cached
    config = json.loads((served / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(served)
    assert config["image_token_index"] == processor.tokenizer.convert_tokens_to_ids("<image>") == 4
    assert config["text_config"]["num_hidden_layers"] == 4 and config["text_config"]["hidden_size"] == 4096
    inputs = processor(images=[Image.new("RGB", (64, 64))], text=["<image>\nWhat is it?"], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == 4).sum()) == 576  # (336 / 14)² patches, as the architecture makes
    with pytest.raises(ConfigError, match="served for family 'llava' only"):
        random_weights_dir(arch, "qwen2_5_vl")
