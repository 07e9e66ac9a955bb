"""Bad input and faults (issue 11): one line naming the problem and the allowed values, exit 2, nothing written."""

import os

import pytest
import yaml
from PIL import Image, ImageFile
from typer.testing import CliRunner

import vtprune
from vtprune.cli import app
from vtprune.results import write_json, write_jsonl

FINISHED = "2025-01-01T00:01:00+00:00"


@pytest.fixture
def no_model(monkeypatch):
    """Every check under test must fail before a model loads."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(vtprune, "load", load)


def config(tmp_path, data=None, **sections):
    path = tmp_path / "c.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump({"model": {"path": "tiny:llava"}, **sections}))
    return path


def image(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (32, 32), (200, 100, 0)).save(path)
    return path


def error_line(result, code=2):
    """The one stderr line of a failed command (no traceback)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# 1. --image that is not an image, or a truncated JPEG


def not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture\n")
    return path


def truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with Image.open(path) as opened:  # the header still reads: only decoding the pixels fails
        assert opened.size == (64, 64)
    return path


@pytest.mark.parametrize("lenient", [False, True], ids=["strict-pil", "lenient-pil"])
@pytest.mark.parametrize("command", ["generate", "show"])
@pytest.mark.parametrize("make", [not_an_image, truncated_jpeg])
def test_image_that_does_not_decode(tmp_path, no_model, monkeypatch, command, make, lenient):
    # Importing lmms-eval turns on PIL's LOAD_TRUNCATED_IMAGES for the whole process: the check must not rely on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    bad = make(tmp_path)
    out = tmp_path / "out" / "kept.png"
    extra = ["-o", out] if command == "show" else []
    line = error_line(invoke(command, "-c", config(tmp_path), "--image", bad, "-q", "?", *extra))
    assert line.startswith(f"error: --image: {bad} is not a readable image (")
    assert "allowed: an image file PIL can read" in line
    assert not out.parent.exists()


# 2. report over corrupt or unfinished runs


def write_run(run_dir, finished=FINISHED, value=0.5):
    write_jsonl(run_dir / "metrics.jsonl", [{
        "model": "tiny:llava", "strategy": "none", "keep_ratio": 1.0, "task": "task_a", "metric": "exact_match",
        "value": value, "stderr": None, "n": 2, "scored": True,
    }])
    write_json(run_dir / "run.json", {"name": run_dir.name, "kind": "eval", "smoke": True, "finished": finished})


@pytest.mark.parametrize("file,text,problem", [
    ("metrics.jsonl", '{"task": "task_a"}\n{"task": \n', "a line is not a JSON object"),
    ("bench.jsonl", "not json\n", "a line is not a JSON object"),
    ("run.json", "[]", "not a JSON object"),
    ("run.json", "3", "not a JSON object"),
])
def test_report_skips_a_corrupt_run_with_a_note(tmp_path, file, text, problem):
    root = tmp_path / "results"
    write_run(root / "good")
    write_run(root / "bad", value=0.123)
    (root / "bad" / file).write_text(text)
    result = invoke("report", root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r.md").read_text()
    assert f"- {root / 'bad' / file}: {problem}, skipped" in report
    assert "0.123" not in report and "(1 runs)" in report


def test_report_lists_interrupted_runs_in_notes(tmp_path):
    root = tmp_path / "results"
    write_run(root / "good")
    write_run(root / "unfinished", finished=None)
    write_run(root / "no-run-json")
    (root / "no-run-json" / "run.json").unlink()
    result = invoke("report", root, "-o", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    notes = (tmp_path / "r.md").read_text().partition("## Notes")[2]
    for name in ("unfinished", "no-run-json"):
        assert f"- interrupted or still running: {root / name} — run the same command again to resume" in notes

    result = invoke("report", root / "unfinished")
    line = error_line(result)
    assert line.startswith("error: RESULTS_DIR: no complete runs") and "interrupted or still running" in line


# 3. output paths that cannot be written


def test_output_dir_below_a_file(tmp_path, no_model):
    (tmp_path / "somefile.txt").write_text("x")
    line = error_line(invoke("bench", "-c", config(tmp_path, name="r"), "-o", tmp_path / "somefile.txt" / "sub"))
    assert line == (f"error: --output-dir: cannot write {tmp_path / 'somefile.txt' / 'sub' / 'r'}: "
                    f"{tmp_path / 'somefile.txt'} is a file, not a folder (allowed: a path in a writable folder)")


def test_output_dir_not_writable(tmp_path, no_model, monkeypatch):
    # Tests may run as root, for whom every folder is writable: pretend this one is not.
    monkeypatch.setattr(os, "access", lambda path, mode: os.path.realpath(path) != str(tmp_path.resolve()))
    out = tmp_path / "new" / "deeper"
    line = error_line(invoke("eval", "-c", config(tmp_path), "--dry-run", "-o", out))
    assert line.startswith(f"error: --output-dir: cannot write {out / 'c'}: folder {tmp_path} is not writable")
    assert not (tmp_path / "new").exists()


def test_output_files_of_report_and_show(tmp_path, no_model):
    (tmp_path / "somefile.txt").write_text("x")
    root = tmp_path / "results"
    write_run(root / "good")
    target = tmp_path / "somefile.txt" / "REPORT.md"
    line = error_line(invoke("report", root, "-o", target))
    assert line.startswith(f"error: --output: cannot write {target}: {tmp_path / 'somefile.txt'} is a file")
    line = error_line(invoke("report", root, "-o", tmp_path / "r.md", "--plots-dir", tmp_path / "somefile.txt"))
    assert line.startswith("error: --plots-dir: ") and not (tmp_path / "r.md").exists()
    line = error_line(invoke("report", root, "-o", root))
    assert line == f"error: --output: {root} is a folder, not a file (allowed: a file path in a writable folder)"
    target = tmp_path / "somefile.txt" / "kept.png"
    line = error_line(invoke("show", "-c", config(tmp_path), "--image", image(tmp_path), "-q", "?", "-o", target))
    assert line.startswith(f"error: --output: cannot write {target}: ")


# 4. a run name that would write outside --output-dir


@pytest.mark.parametrize("name", ["../../escape", "a/b", "", ".", ".."])
def test_name_must_be_a_plain_folder_name(tmp_path, name):
    out = tmp_path / "deep" / "out"
    line = error_line(invoke("eval", "-c", config(tmp_path, name=name), "--dry-run", "-o", out))
    assert line.startswith(f"error: name: '{name}' is not allowed (allowed: a folder name of letters, digits")
    assert list(tmp_path.iterdir()) == [tmp_path / "c.yaml"]


# 5. eval.generation keys and values, at config load


@pytest.mark.parametrize("generation,message", [
    ({"max_tokens": 3}, "eval.generation.max_tokens: unknown key (allowed: max_new_tokens, min_new_tokens, do_sample, "),
    ({"max_new_tokens": 0}, "eval.generation.max_new_tokens: 0 is not allowed (allowed: a positive integer)"),
    ({"temperature": -1}, "eval.generation.temperature: -1 is not allowed (allowed: a number >= 0)"),
    ({"top_p": 1.5}, "eval.generation.top_p: 1.5 is not allowed (allowed: a number in (0, 1])"),
    ({"num_beams": 0}, "eval.generation.num_beams: 0 is not allowed (allowed: a positive integer)"),
    ({"do_sample": "yes"}, "eval.generation.do_sample: 'yes' is not allowed (allowed: true or false)"),
])
def test_generation_keys_are_checked_at_load(tmp_path, generation, message):
    out = tmp_path / "out"
    line = error_line(invoke("eval", "-c", config(tmp_path, eval={"generation": generation}), "--dry-run", "-o", out))
    assert line.startswith(f"error: {message}")
    assert not out.exists()


def test_generation_keys_that_are_allowed(tmp_path):
    generation = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7, "top_p": 1, "top_k": 0, "num_beams": 2}
    result = invoke("eval", "-c", config(tmp_path, eval={"generation": generation}), "--dry-run")
    assert result.exit_code == 0, result.output


# 6. --dry-run bounds fastv's layer by the model's config (no weights)


@pytest.mark.parametrize("path,layer,message", [
    ("tiny:llava", 99, "99 is outside the allowed range [1, 3] for tiny:llava (4 decoder layers)"),
    ("tiny:llava_next", 4, "4 is outside the allowed range [1, 3] for tiny:llava_next (4 decoder layers)"),
    ("tiny:llava", 0, "0 is outside the allowed range [1, 3] for tiny:llava (4 decoder layers)"),
    ("tiny:qwen2_5_vl", 99, "99 is outside the allowed range [1, 3] for tiny:qwen2_5_vl (4 decoder layers)"),
])
def test_fastv_layer_outside_the_model(tmp_path, path, layer, message):
    data = {"model": {"path": path}, "pruning": {"strategy": "fastv", "placement": {"layer": layer}}}
    line = error_line(invoke("eval", "-c", config(tmp_path, yaml.safe_dump(data)), "--dry-run"))
    assert line == f"error: pruning.placement.layer: {message}"


def test_fastv_layer_bound_read_from_a_local_config(tmp_path):
    from pathlib import Path

    arch = Path(__file__).parents[2] / "configs" / "architectures" / "llava-1.5-7b"
    data = {"model": {"path": str(arch), "weights": "random"},
            "pruning": {"strategy": "fastv", "placement": {"layer": 32}}}
    line = error_line(invoke("eval", "-c", config(tmp_path, yaml.safe_dump(data)), "--dry-run"))
    assert line == f"error: pruning.placement.layer: 32 is outside the allowed range [1, 31] for {arch} (32 decoder layers)"
    # A model whose config cannot be read offline is checked when it loads, not here.
    data["model"] = {"path": "nobody/not-cached-llava", "family": "llava"}
    assert invoke("eval", "-c", config(tmp_path, yaml.safe_dump(data)), "--dry-run").exit_code == 0


# 7. an empty config file, a config path that is a folder


def test_empty_config_needs_model_path(tmp_path):
    line = error_line(invoke("eval", "-c", config(tmp_path, ""), "--dry-run"))
    assert line == "error: model.path: required (HF id, local dir, or tiny:mllama|tiny:llava|tiny:llava_next|tiny:qwen2_5_vl|tiny:llava_onevision|tiny:internvl)"


def test_config_that_is_a_folder(tmp_path):
    line = error_line(invoke("eval", "-c", tmp_path, "--dry-run"))
    assert line == f"error: config: {tmp_path} is a directory, not a YAML file"


# 8. errors name the option the user typed


@pytest.mark.parametrize("args,message", [
    (["bench", "--batch-sizes", "0,4"], "--batch-sizes: [0, 4] must be a list of positive integers"),
    (["bench", "--ratios", "0,0.5"], "--ratios: 0.0 is outside the allowed range (0, 1]"),
    (["bench", "--threads", "0"], "--threads: 0 must be a positive integer or null"),
    (["eval", "--dry-run", "--limit", "0"], "--limit: 0 must be a positive integer"),
    (["eval", "--dry-run", "--tasks", ","], "--tasks: ',' must be a comma-separated list of str values, none empty"),
    (["generate", "--keep-ratio", "2", "-q", "?"], "--keep-ratio: 2.0 is outside the allowed range (0, 1]"),
    (["generate", "--strategy", "magic", "-q", "?"], "--strategy: unknown strategy 'magic' (allowed: adav, "),
])
def test_errors_name_the_option(tmp_path, no_model, args, message):
    command, *rest = args
    extra = ["--image", image(tmp_path)] if command == "generate" else ["-o", tmp_path / "out"]
    line = error_line(invoke(command, "-c", config(tmp_path), *extra, *rest))
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


# 9. Ctrl-C


def test_ctrl_c_is_one_line_exit_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vtprune, "load", interrupted)
    out = tmp_path / "out"
    line = error_line(invoke("bench", "-c", config(tmp_path), "-o", out), code=130)
    assert line == "interrupted — run the same command again to resume"
    assert not out.exists()


@pytest.mark.parametrize("doc, kept, where", [(1, 0.7, "task vtprune_textvqa_mini doc 1: "),
                                              (0, 0.02, "an image of task vtprune_textvqa_mini ")])
def test_an_unreadable_image_in_the_eval_data_is_one_line(tmp_path, monkeypatch, doc, kept, where):
    import io

    import datasets

    from vtprune.eval import mini, runner

    rows, features = mini._textvqa()
    jpeg = io.BytesIO()
    rows[doc]["image"].save(jpeg, format="JPEG")
    # 70 %: the header opens, the pixels are cut short; 2 %: not even the header opens.
    rows[doc]["image"] = {"bytes": jpeg.getvalue()[: int(kept * jpeg.tell())], "path": "sign.jpg"}
    broken = tmp_path / "broken"
    data = datasets.Dataset.from_list(rows[:2], features=datasets.Features(features))
    datasets.DatasetDict({"validation": data}).save_to_disk(str(broken))
    monkeypatch.setattr(runner, "task_spec", lambda name: {"task": name, "dataset_path": str(broken)})
    out = tmp_path / "results"
    tasks = {"tasks": ["vtprune_textvqa_mini"], "generation": {"max_new_tokens": 2}}
    result = CliRunner().invoke(app, ["eval", "-c", str(config(tmp_path, eval=tasks)), "-o", str(out)])
    line = error_line(result)
    assert line.startswith("error: eval data: ") and where in line and "readable" in line
    assert not (out / "c").exists() or not any((out / "c").iterdir())


# 10. an empty item in a comma list is a value lost in typing, not one to skip


@pytest.mark.parametrize("args,option,text,kind", [
    (["sweep", "ratios", "--ratios", "0.5,,0.25"], "--ratios", "0.5,,0.25", "float"),
    (["sweep", "ratios", "--ratios", "0.5,0.25,"], "--ratios", "0.5,0.25,", "float"),
    (["sweep", "ratios", "--ratios", "0.5", "--strategies", ",uniform"], "--strategies", ",uniform", "str"),
    (["bench", "--ratios", " , 0.5"], "--ratios", " , 0.5", "float"),
    (["bench", "--batch-sizes", "1,,4"], "--batch-sizes", "1,,4", "int"),
    (["bench", "--strategies", "uniform, ,random"], "--strategies", "uniform, ,random", "str"),
    (["cost", "--ratios", ""], "--ratios", "", "float"),
    (["eval", "--tasks", "vtprune_textvqa_mini,,vtprune_vqav2_mini"], "--tasks",
     "vtprune_textvqa_mini,,vtprune_vqav2_mini", "str"),
    (["show", "--strategies", "uniform,", "--image", "IMAGE", "-q", "?"], "--strategies", "uniform,", "str"),
])
def test_an_empty_list_item_is_refused(tmp_path, no_model, args, option, text, kind):
    args = [image(tmp_path) if a == "IMAGE" else a for a in args]
    out = tmp_path / ("kept.png" if args[0] == "show" else "out")
    line = error_line(invoke(*args, "-c", config(tmp_path), *(["-o", out] if args[0] != "cost" else [])))
    assert line == f"error: {option}: {text!r} must be a comma-separated list of {kind} values, none empty"
    assert not out.exists()


# 11. generate / show options that used to fail inside the model


@pytest.mark.parametrize("tokens", ["0", "-1", "-100"])
def test_max_new_tokens_must_be_positive(tmp_path, no_model, tokens):
    line = error_line(invoke("generate", "-c", config(tmp_path), "--image", image(tmp_path), "-q", "?",
                             "--max-new-tokens", tokens))
    assert line == f"error: --max-new-tokens: {tokens} is not allowed (allowed: a positive integer)"


@pytest.mark.parametrize("raw,what,position", [
    (b"caf\xe9?", "byte 0xe9", 4),  # Latin-1
    (b"\xff\xfe what", "byte 0xff", 1),
    (b"ok \xe2\x82", "byte 0xe2", 4),  # a UTF-8 sequence cut short
])
@pytest.mark.parametrize("command", ["generate", "show"])
def test_a_question_that_is_not_utf8(tmp_path, no_model, command, raw, what, position):
    # What Python makes of such argv bytes: surrogate escapes.
    question = raw.decode("utf-8", "surrogateescape")
    out = tmp_path / "kept.png"
    extra = ["-o", out] if command == "show" else []
    line = error_line(invoke(command, "-c", config(tmp_path), "--image", image(tmp_path), "-q", question, *extra))
    assert line == f"error: --question: {what} at position {position} is not UTF-8 text (allowed: UTF-8 text)"
    assert not out.exists()


SHOW_TYPES = ".png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff"


@pytest.mark.parametrize("name,problem", [
    ("kept.xyz", "'.xyz' is not an image type show writes"),
    ("kept.txt", "'.txt' is not an image type show writes"),
    ("kept.png.part", "'.part' is not an image type show writes"),
    ("kept", "no image extension"),
])
def test_show_output_of_an_unknown_type(tmp_path, no_model, name, problem):
    out = tmp_path / "out" / name
    line = error_line(invoke("show", "-c", config(tmp_path), "--image", image(tmp_path), "-q", "?", "-o", out))
    assert line == f"error: --output: {name}: {problem} (allowed: {SHOW_TYPES})"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,format", [("kept.JPG", "JPEG"), ("kept.webp", "WEBP"), ("kept.tif", "TIFF")])
def test_show_writes_the_type_its_extension_names(tmp_path, name, format):
    out = tmp_path / name
    result = invoke("show", "-c", config(tmp_path), "--image", image(tmp_path), "-q", "?", "-o", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        assert written.format == format
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
