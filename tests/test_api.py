import pytest
import yaml
from PIL import Image

import vtprune
from vtprune.errors import ConfigError


def test_load_from_yaml_and_from_keywords_give_the_same_pipeline(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5}, "seed": 3,
    }))
    a = vtprune.load(path)
    b = vtprune.load(model="tiny:llava", strategy="uniform", keep_ratio=0.5, seed=3)
    da, db = a.config.to_dict(), b.config.to_dict()
    da.pop("name"), db.pop("name")
    assert da == db
    assert a.plan.strategy is b.plan.strategy and a.plan.keep_ratio == b.plan.keep_ratio == 0.5
    img = Image.new("RGB", (48, 40), (10, 200, 30))
    ra = a.generate([img], ["What is shown?"], max_new_tokens=5)[0]
    rb = b.generate([img], ["What is shown?"], max_new_tokens=5)[0]
    assert (ra.text, ra.kept, ra.num_visual) == (rb.text, rb.kept, rb.num_visual)
    assert ra.num_visual == 16 and ra.num_kept == 8 and ra.kept_fraction == 0.5


def test_keywords_override_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5}}))
    pipe = vtprune.load(path, keep_ratio=0.25)
    assert pipe.config.pruning.keep_ratio == 0.25 and pipe.config.pruning.strategy == "uniform"


def test_with_pruning_shares_the_model():
    pipe = vtprune.load(model="tiny:llava")
    other = pipe.with_pruning("random", 0.5)
    assert other.model is pipe.model and other.plan.strategy.name == "random"
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    assert other.generate([img], ["hi"], max_new_tokens=2)[0].num_kept == 8
    assert pipe.generate([img], ["hi"], max_new_tokens=2)[0].num_kept == 16


def test_unknown_keyword():
    with pytest.raises(ConfigError, match="load: unknown keyword 'ratio'"):
        vtprune.load(model="tiny:llava", ratio=0.5)


def test_image_prompt_count_mismatch():
    pipe = vtprune.load(model="tiny:llava")
    with pytest.raises(ValueError, match="one image per prompt"):
        pipe.generate([Image.new("RGB", (32, 32))], ["a", "b"])


def test_an_unreadable_image_file_is_one_clear_error(tmp_path, monkeypatch):
    from PIL import ImageFile

    from vtprune.errors import VtpruneError

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # PIL's default; importing lmms_eval turns it on
    pipe = vtprune.load(model="tiny:llava")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for path in (text, truncated, tmp_path / "missing.png"):
        with pytest.raises(VtpruneError, match=rf"^image: {path} is not a readable image \(.+\)$"):
            pipe.generate([path], ["What?"], max_new_tokens=1)
    assert pipe.generate([whole], ["What?"], max_new_tokens=1)[0].num_visual == 16
