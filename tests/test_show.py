import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import vtprune
from vtprune.cli import app
from vtprune.report.show import DIM, draw_panels, token_layout

COLOR = (200, 180, 160)


@pytest.fixture(scope="module")
def pipe():
    return vtprune.load(model="tiny:llava", strategy="uniform", keep_ratio=0.5)


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 48), COLOR).save(path)
    return path


def _bright(pixel) -> bool:
    # Kept patches keep the image's colour; pruned ones are dimmed to DIM of it.
    return pixel[0] > (1 + DIM) / 2 * COLOR[0]


def test_llava_layout_is_one_crop_of_4x4_patches(pipe, tmp_path):
    inputs = pipe.prepare([Image.open(_image(tmp_path))], ["What?"])
    layout = token_layout(pipe.adapter, inputs)
    assert layout.image.size == (32, 32)
    assert layout.boxes[0] == (0, 0, 8, 8) and layout.boxes[1] == (8, 0, 16, 8) and layout.boxes[4] == (0, 8, 8, 16)
    assert len(layout.boxes) == 16
    assert max(abs(a - b) for a, b in zip(layout.image.getpixel((16, 16)), COLOR)) <= 2  # de-normalised back


def _check_panel(drawing, layout, boxes, kept, x_offset, scale, title_h=24):
    """Every patch centre: bright exactly where the kept boxes are."""
    assert sorted(boxes) == sorted(
        (x_offset + x0 * scale, y0 * scale + title_h, x_offset + x1 * scale, y1 * scale + title_h)
        for x0, y0, x1, y1 in (layout.boxes[i] for i in kept))
    bright = []
    for i, (x0, y0, x1, y1) in enumerate(layout.boxes):
        centre = (x_offset + (x0 + x1) * scale // 2, title_h + (y0 + y1) * scale // 2)
        if _bright(drawing.getpixel(centre)):
            bright.append(i)
    assert bright == kept


def test_show_cli_highlights_exactly_the_kept_patches(pipe, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5}}))
    out = tmp_path / "kept.png"
    result = CliRunner().invoke(app, ["show", "-c", str(config), "--image", str(_image(tmp_path)), "-q", "What?", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "uniform @ 0.5: kept 8/16" in result.stderr
    drawing = Image.open(out).convert("RGB")

    kept = pipe.generate([_image(tmp_path)], ["What?"], max_new_tokens=1)[0].kept
    assert len(kept) == 8
    layout = token_layout(pipe.adapter, pipe.prepare([Image.open(_image(tmp_path))], ["What?"]))
    scale = 10  # 32 px view enlarged to 320
    assert drawing.size == (320, 320 + 24)
    bright = [i for i, (x0, y0, x1, y1) in enumerate(layout.boxes)
              if _bright(drawing.getpixel(((x0 + x1) * scale // 2, 24 + (y0 + y1) * scale // 2)))]
    assert bright == kept


def test_two_strategies_two_panels(pipe, tmp_path):
    from vtprune.report.show import show

    drawing, panels, boxes = show(pipe, _image(tmp_path), "What?", ["uniform", "random"], keep_ratio=0.25)
    assert [p.strategy for p in panels] == ["uniform", "random"]
    assert [len(p.kept) for p in panels] == [4, 4] and all(p.num_visual == 16 for p in panels)
    assert [len(b) for b in boxes] == [4, 4]
    layout = token_layout(pipe.adapter, pipe.prepare([Image.open(_image(tmp_path))], ["What?"]))
    scale, gap = 10, 8
    assert drawing.size == (2 * 320 + gap, 320 + 24)
    for k, panel in enumerate(panels):
        _check_panel(drawing.convert("RGB"), layout, boxes[k], panel.kept, k * (320 + gap), scale)


def test_layout_mismatch_is_an_error(pipe, tmp_path):
    from vtprune.errors import VtpruneError
    from vtprune.report.show import Panel

    layout = token_layout(pipe.adapter, pipe.prepare([Image.open(_image(tmp_path))], ["What?"]))
    with pytest.raises(VtpruneError, match="layout has 16 visual tokens"):
        draw_panels(layout, [Panel("uniform", 0.5, [0, 1], 17)])


def test_show_unknown_strategy_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}}))
    result = CliRunner().invoke(app, ["show", "-c", str(config), "--image", str(_image(tmp_path)), "-q", "?",
                                      "-o", str(tmp_path / "o.png"), "--strategies", "uniform,nope"])
    assert result.exit_code == 2 and "unknown strategy 'nope'" in result.stderr


@pytest.mark.parametrize("family,model_class", [("llava_next", "LlavaNextForConditionalGeneration"),
                                                ("mllama", "MllamaForConditionalGeneration")])
def test_other_family_layouts_count_the_models_tokens(family, model_class):
    """Adapter-independent: the layout has one entry per visual token of the model's own sequence."""
    import torch
    import transformers
    from transformers import AutoProcessor

    from vtprune.models.base import Adapter
    from vtprune.models.tiny import tiny_path

    path = tiny_path(family)
    adapter = Adapter(getattr(transformers, model_class).from_pretrained(path).eval(), AutoProcessor.from_pretrained(path))
    adapter.family = family
    inputs = adapter.prepare([Image.new("RGB", (64, 40), COLOR)], ["What?"])
    layout = token_layout(adapter, inputs)
    patches = [b for b in layout.boxes if b is not None]
    assert len(set(patches)) == len(patches)
    if family == "llava_next":
        # 16 base tokens + the 64x64 grid unpadded to 6 rows of 8 patches, each row ending in a newline token.
        assert len(layout.boxes) == int((inputs["input_ids"] == adapter.model.config.image_token_id).sum()) == 70
        assert layout.boxes[16:24] == [(40 + 8 * c, 8, 48 + 8 * c, 16) for c in range(8)] and layout.boxes[24] is None
    else:
        with torch.no_grad():
            vision = adapter.model.model.vision_model(
                pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        tiles = int(inputs["aspect_ratio_mask"].sum())
        assert len(layout.boxes) == tiles * vision.shape[-2] == 4 * 17
        assert [b is None for b in layout.boxes].count(True) == tiles and layout.boxes[17] is None
        assert layout.image.size == (64, 64)
