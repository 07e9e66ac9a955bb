"""scripts/train_micro.py end to end on a few samples: both stages run, save a checkpoint vtprune loads, and the
micro mllama's vision attention stays zero and frozen through both stages."""

import importlib.util
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import vtprune

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_micro.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_micro", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_stages_train_and_save_a_loadable_mllama(tmp_path, capsys):
    train = _script()
    first, second = tmp_path / "first", tmp_path / "second"
    # the script sets torch's thread count for the whole process: keep the session's own
    threads = str(torch.get_num_threads())
    common = ["--family", "mllama", "--steps", "2", "--batch", "4", "--train-samples", "8", "--threads", threads]
    assert train.main([*common, "--out", str(first)]) == 0
    assert train.main([*common, "--init", str(first), "--seed", "1", "--out", str(second)]) == 0
    assert "val colour" in capsys.readouterr().out

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    o_proj = [k for k in a if "vision_model" in k and "self_attn.o_proj" in k]
    assert len(o_proj) == 5  # 4 local + 1 global layer
    assert all(not a[k].any() and not b[k].any() for k in o_proj)
    frozen = [k for k in a if "vision_model" in k and "self_attn" in k]
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert not torch.equal(a["vision_model.patch_embedding.weight"], b["vision_model.patch_embedding.weight"])
    image = Image.new("RGB", (64, 64), "white")
    out = vtprune.load(model=str(second)).generate([image], ["How many shapes are there?"], max_new_tokens=2,
                                                   do_sample=False)
    assert len(out) == 1 and out[0].num_visual == 68
