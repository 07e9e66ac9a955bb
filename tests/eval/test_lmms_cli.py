"""lmms-eval's own CLI driving vtprune (``python -m lmms_eval --model vtprune``), and data-parallel eval on CPU.

The local task is lmms-eval's official textvqa_val YAML text, with only its dataset pointing at vtprune's
generated offline mirror (and a new task name: lmms-eval's own index would otherwise win over --include_path).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vtprune.results import read_jsonl


def free_port() -> int:
    """A loopback port nobody holds now: two test runs on one machine must not share torchrun's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, cwd, timeout=300):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    import lmms_eval

    from vtprune.eval.mini import mini_dataset_path

    official = Path(lmms_eval.__file__).parent / "tasks" / "textvqa"
    folder = tmp_path_factory.mktemp("tasks")
    leaf = (official / "textvqa_val.yaml").read_text()
    (folder / "textvqa_val.yaml").write_text(leaf.replace("task: textvqa_val\n", "task: textvqa_val_offline\n"))
    data = mini_dataset_path("vtprune_textvqa_mini")
    template = (official / "_default_template_textvqa_yaml").read_text()
    template = template.replace("dataset_path: lmms-lab-encoder/textvqa",
                                f"dataset_path: {data}\ndataset_kwargs:\n  load_from_disk: true")
    assert str(data) in template
    (folder / "_default_template_textvqa_yaml").write_text(template)
    # The official YAML names its functions `utils.X`, relative to its folder.
    (folder / "utils.py").write_text("from lmms_eval.tasks.textvqa.utils import *  # noqa: F401,F403\n")
    return folder


def write_config(folder, **pruning):
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5, **pruning},
        "eval": {"generation": {"max_new_tokens": 6, "do_sample": False}},
    }))
    return config


def lmms_eval(config, local_task, out, *extra):
    args = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args", f"config={config}",
            "--tasks", "textvqa_val_offline", "--include_path", str(local_task), "--limit", "2", "--log_samples",
            "--output_path", str(out), *extra]
    run(args, cwd=out.parent)
    (samples,) = out.rglob("*_samples_textvqa_val_offline.jsonl")
    (results,) = out.rglob("*_results.json")
    return read_jsonl(samples), json.loads(results.read_text())


def test_lmms_eval_cli_logs_kept_counts_and_honours_gen_kwargs(tmp_path, local_task):
    config = write_config(tmp_path)
    samples, results = lmms_eval(config, local_task, tmp_path / "default")
    for s in samples:
        (counts,) = s["token_counts"]
        assert (counts["num_visual"], counts["num_kept"], counts["kept_fraction"]) == (16, 8, 0.5)
        assert (counts["strategy"], counts["keep_ratio"]) == ("uniform", 0.5)
        assert counts["output_tokens"] == 6  # the config's max_new_tokens: a random model never stops early
        assert counts["input_tokens"] > 8
    assert results["throughput"]["avg_num_kept"] == 8 and results["throughput"]["avg_keep_ratio"] == 0.5

    short, results = lmms_eval(config, local_task, tmp_path / "short", "--gen_kwargs", "max_new_tokens=1")
    assert results["config"]["gen_kwargs"] == {"max_new_tokens": 1}
    assert [s["token_counts"][0]["output_tokens"] for s in short] == [1, 1]


def test_lmms_eval_cli_apply_chat_template_and_system_instruction(tmp_path, local_task):
    config = write_config(tmp_path)
    samples, results = lmms_eval(config, local_task, tmp_path / "chat", "--apply_chat_template",
                                 "--system_instruction", "Be brief.")
    assert results["chat_template"] and results["chat_template_sha"]
    assert all(s["input"].startswith("Be brief.\n") for s in samples)
    assert all(s["token_counts"][0]["num_kept"] == 8 for s in samples)


def test_model_args_override_the_yaml_and_name_the_model(tmp_path, local_task):
    config = write_config(tmp_path)
    out = tmp_path / "named"
    args = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args",
            f"config={config},model=tiny:llava,strategy=random,keep_ratio=0.25", "--tasks", "textvqa_val_offline",
            "--include_path", str(local_task), "--limit", "1", "--log_samples", "--output_path", str(out)]
    run(args, cwd=tmp_path)
    (results,) = out.rglob("*_results.json")
    assert json.loads(results.read_text())["model_name"] == "tiny:llava"
    (samples,) = out.rglob("*_samples_*.jsonl")
    (counts,) = read_jsonl(samples)[0]["token_counts"]
    assert (counts["strategy"], counts["keep_ratio"], counts["num_kept"]) == ("random", 0.25, 4)


def test_request_generation_follows_lmms_eval_conventions():
    from vtprune.eval.lmms_model import request_generation

    assert request_generation({"until": ["ASSISTANT:"], "max_new_tokens": 2, "temperature": 0, "top_p": 1.0}) == (
        {"max_new_tokens": 2, "do_sample": False}, ["ASSISTANT:"])
    assert request_generation({"temperature": 0.7, "top_p": 0.9, "until": "\n\n", "num_beams": 1}) == (
        {"temperature": 0.7, "do_sample": True, "top_p": 0.9, "num_beams": 1}, ["\n\n"])
    assert request_generation({"do_sample": True, "temperature": 1.0}) == ({"do_sample": True, "temperature": 1.0}, [])
    # vtprune eval: the config's settings win over the task's (llava_in_the_wild asks for 4096 tokens).
    task = {"until": ["ASSISTANT:"], "max_new_tokens": 4096, "temperature": 0.2, "top_p": 1.0}
    assert request_generation(task, {"max_new_tokens": 3, "do_sample": False}) == (
        {"max_new_tokens": 3, "do_sample": False}, ["ASSISTANT:"])


def test_batch_size_auto_and_unknown_model_args_are_clear_errors(tmp_path):
    from lmms_eval import models

    cls = models.get_model("vtprune")
    config = write_config(tmp_path)
    with pytest.raises(ValueError, match=r"--batch_size auto is not supported: give a number"):
        cls.create_from_arg_string(f"config={config}", {"batch_size": "auto"})
    with pytest.raises(ValueError, match=r"unknown model_args \['keep'\] \(allowed: config, model, strategy"):
        cls.create_from_arg_string(f"config={config},keep=0.5")


def test_response_cache_refuses_a_changed_config(tmp_path, monkeypatch):
    from vtprune.config import load_config
    from vtprune.eval.lmms_model import _check_response_cache

    config = write_config(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["lmms_eval", "--use_cache", str(cache), "--model_args", f"config={config}"])
    _check_response_cache(str(config), load_config(config))
    _check_response_cache(str(config), load_config(config))  # unchanged: fine
    write_config(tmp_path, keep_ratio=0.25)
    with pytest.raises(ValueError, match="changed since lmms-eval cached answers"):
        _check_response_cache(str(config), load_config(config))
    monkeypatch.setattr(sys, "argv", ["lmms_eval", f"--use_cache={tmp_path / 'other'}"])
    _check_response_cache(str(config), load_config(config))  # a fresh cache folder takes it


def test_two_process_cpu_eval_equals_one_process(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "dp", "model": {"path": "tiny:llava", "device": "cpu"},
        "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
        "eval": {"tasks": ["vtprune_textvqa_mini", "vtprune_vqav2_mini"], "generation": {"max_new_tokens": 3}},
    }))
    eval_args = ["eval", "-c", str(config), "--limit", "3", "-o"]
    run([sys.executable, "-m", "vtprune", *eval_args, str(tmp_path / "one")], cwd=tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    run([*torchrun, "-m", "vtprune", *eval_args, str(tmp_path / "two")], cwd=tmp_path)

    def rows(folder, name):
        return [{k: v for k, v in r.items() if k not in ("select_ms", "first_topk")} for r in read_jsonl(folder / "dp" / name)]

    one, two = rows(tmp_path / "one", "samples.jsonl"), rows(tmp_path / "two", "samples.jsonl")
    assert len(one) == 6 and one == two
    # Two processes use fewer threads each: the log-probabilities agree to float rounding, the ranking exactly.
    for a, b in zip(*(read_jsonl(t / "dp" / "samples.jsonl") for t in (tmp_path / "one", tmp_path / "two"))):
        assert a["first_topk"]["ids"] == b["first_topk"]["ids"]
        assert a["first_topk"]["logprobs"] == pytest.approx(b["first_topk"]["logprobs"], abs=1e-5)
    assert rows(tmp_path / "one", "metrics.jsonl") == rows(tmp_path / "two", "metrics.jsonl")
