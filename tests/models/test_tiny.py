"""The embedded tiny models: built offline, deterministically, loaded back like real checkpoints."""

import pytest
import torch
from PIL import Image

import vtprune
from vtprune.models.tiny import TINY_FAMILIES, tiny_path

IMAGES = [Image.new("RGB", (40, 30), (220, 30, 30)), Image.new("RGB", (30, 70), (20, 40, 200))]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_generates_one_image_two_prompts_batch(family):
    pipe = vtprune.load(model=f"tiny:{family}")
    assert type(pipe.model).__name__ == pipe.adapter.model_class
    out = pipe.generate([IMAGES[0], IMAGES[0]], ["What is shown?", "How many objects are there in the picture?"], max_new_tokens=4)
    assert len(out) == 2
    for r in out:
        assert isinstance(r.text, str)
        assert r.num_visual > 0 and r.kept == list(range(r.num_visual))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_image_changes_the_output(family):
    # Cross-attention gates are non-zero and the init is wide enough that the image matters.
    pipe = vtprune.load(model=f"tiny:{family}")
    inputs = [pipe.prepare([img], ["What is shown?"]) for img in IMAGES]
    with torch.no_grad():
        logits = [pipe.adapter.prefill_logits(i, pipe.plan)[0] for i in inputs]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_build_is_deterministic(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = load_file(str(tiny_path("llava") / "model.safetensors"))
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    second_dir = tiny_path("llava")
    assert str(second_dir).startswith(str(tmp_path))
    second = load_file(str(second_dir / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    path = tiny_path("llava")
    assert path.parent == tmp_path / "tiny" and (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").exists() or (path / "processor_config.json").exists()


def test_tiny_text_layers_table_matches_the_built_models():
    """Config validation bounds fastv's layer by TINY_TEXT_LAYERS without building: it must be the recipe's."""
    from transformers import AutoConfig

    from vtprune.models.tiny import TINY_FAMILIES, TINY_TEXT_LAYERS, tiny_path

    assert set(TINY_TEXT_LAYERS) == set(TINY_FAMILIES)
    for family in TINY_FAMILIES:
        text = AutoConfig.from_pretrained(tiny_path(family)).get_text_config(decoder=True)
        assert text.num_hidden_layers == TINY_TEXT_LAYERS[family], family


# sha256 (first 16 hex digits) of each tiny checkpoint's tensors (names and bytes, sorted by name), as TINY_VERSION
# v1 built them (v2 added files beside the tensors, not the tensors): refactoring the recipe (the micro models reuse
# its builders) must leave every tiny model as it was.
V1_WEIGHTS = {
    "mllama": "bc90d26faab79cf1", "llava": "5e6163a39f40ad3e", "llava_next": "c8d0c74fc38c056e",
    "qwen2_5_vl": "bafcdc534cb2b421", "llava_onevision": "2138dc570486cdc8", "internvl": "80044f9854c2f2be",
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_weights_are_those_of_their_version(family):
    import hashlib

    from safetensors.torch import load_file

    from vtprune.models.tiny import TINY_VERSION

    assert TINY_VERSION == "v2"  # a new recipe gets a new version and new digests here
    tensors = load_file(str(tiny_path(family) / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest()[:16] == V1_WEIGHTS[family]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_tiny_checkpoints_vllm_loads_carry_a_video_processor_config(family):
    import json

    # vLLM's transformers builds these two processors only with a video processor (vtprune's loaders drop it)
    config = json.loads((tiny_path(family) / "video_preprocessor_config.json").read_text())
    image = json.loads((tiny_path(family) / "processor_config.json").read_text())["image_processor"]
    assert config["video_processor_type"] == {"qwen2_5_vl": "Qwen2VLVideoProcessor",
                                              "llava_onevision": "LlavaOnevisionVideoProcessor"}[family]
    assert config["size"] == image["size"] and config["image_mean"] == image["image_mean"]
