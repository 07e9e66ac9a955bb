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


def test_a_merging_strategy_outlines_its_anchors_and_counts_its_merges(pipe, tmp_path):
    from vtprune.report.show import show

    # pool at 0.25 on the 4×4 grid: four 2×2 windows, each merged into its top-left token
    _, panels, boxes = show(pipe, _image(tmp_path), "What?", ["pool"], keep_ratio=0.25)
    assert panels[0].kept == [0, 2, 8, 10] and panels[0].merged == 4
    assert panels[0].title == "pool @ 0.25: kept 4/16 (4 merged)" and len(boxes[0]) == 4


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
    """The family's layout has one entry per visual token of the model's own sequence (not the adapter's records)."""
    import torch
    import transformers
    from transformers import AutoProcessor

    from vtprune.models import FAMILIES
    from vtprune.models.tiny import tiny_path

    path = tiny_path(family)
    model = getattr(transformers, model_class).from_pretrained(path).eval()
    adapter = FAMILIES.get(family)(model, AutoProcessor.from_pretrained(path))
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


@pytest.fixture(scope="module")
def qwen():
    return vtprune.load(model="tiny:qwen2_5_vl", strategy="uniform", keep_ratio=0.5)


def test_qwen2_5_vl_layout_is_the_resized_image_in_merged_cells(qwen):
    """Two images of different sizes in one batch (the second one's patches start after the first one's): each
    view is the processor's own resize of its image, with one 16 px box per merged 2×2 patch cell, in the
    order of the image tokens (checked against the model's own M-RoPE (row, column) of each image token)."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((56, 56), (112, 56))]
    inputs = qwen.prepare(images, ["What?", "What is it?"])
    model, processor = qwen.adapter.model, qwen.adapter.processor.image_processor
    positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    for b, (image, tokens, size) in enumerate(zip(images, (16, 28), ((64, 64), (112, 64)))):
        layout = token_layout(qwen.adapter, inputs, b)
        image_tokens = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        assert len(layout.boxes) == len(image_tokens) == tokens
        _, grid_h, grid_w = inputs["image_grid_thw"][b].tolist()
        assert layout.image.size == (grid_w * 8, grid_h * 8) == size
        resized = image.resize(size, processor.resample)  # what the processor did before normalising
        diff = np.abs(np.asarray(layout.image, dtype=int) - np.asarray(resized, dtype=int))
        assert diff.max() <= 2, diff.max()
        t, rows, cols = positions[:, b, image_tokens]
        rows, cols = (rows - t).tolist(), (cols - t).tolist()
        assert layout.boxes == [(16 * c, 16 * r, 16 * c + 16, 16 * r + 16) for r, c in zip(rows, cols)]
        assert layout.boxes[1] == (16, 0, 32, 16) and layout.boxes[size[0] // 16] == (0, 16, 16, 32)  # raster


def test_qwen2_5_vl_show_cli_highlights_the_kept_cells(qwen, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (112, 56), COLOR).save(path)  # resized to 112 × 64: 7 × 4 merged cells
    config = tmp_path / "q.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:qwen2_5_vl"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5}}))
    out = tmp_path / "kept.png"
    result = CliRunner().invoke(app, ["show", "-c", str(config), "--image", str(path), "-q", "What?", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "uniform @ 0.5: kept 14/28" in result.stderr
    drawing = Image.open(out).convert("RGB")
    scale = 3  # 112 px wide view enlarged to 336
    assert drawing.size == (112 * scale, 64 * scale + 24)

    kept = qwen.generate([path], ["What?"], max_new_tokens=1)[0].kept
    assert len(kept) == 14
    layout = token_layout(qwen.adapter, qwen.prepare([Image.open(path)], ["What?"]))
    bright = [i for i, (x0, y0, x1, y1) in enumerate(layout.boxes)
              if _bright(drawing.getpixel(((x0 + x1) * scale // 2, 24 + (y0 + y1) * scale // 2)))]
    assert bright == kept
