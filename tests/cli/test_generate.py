import yaml
from PIL import Image
from typer.testing import CliRunner

from vtprune.cli import app


def test_generate_command_prints_answer_and_kept_count(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.25}}))
    image = tmp_path / "i.png"
    Image.new("RGB", (64, 48), (200, 100, 0)).save(image)
    result = CliRunner().invoke(app, ["generate", "-c", str(config), "--image", str(image), "-q", "What is it?", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "[uniform @ 0.25] kept 4/16 visual tokens (0.250)" in result.stderr
    # A tiny random model's answer is garbled by design: said once, so that it does not read as a broken install.
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: tiny:llava is a tiny random model: this answer is a smoke output, not a real one"]


def test_generate_missing_image(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}}))
    result = CliRunner().invoke(app, ["generate", "-c", str(config), "--image", str(tmp_path / "x.png"), "-q", "?"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --image: file not found: {tmp_path / 'x.png'}"
