"""Faults of the machine, not of the input (issue 34): a full disk, a cache or home folder that cannot be written.
Each is one line on stderr and exit code 1, with nothing half-written that a later run would trust."""

import errno
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.results import is_complete, write_json, write_jsonl

FULL = "No space left on device"
FOLDER_VARIABLES = ("VTPRUNE_CACHE", "LMMS_EVAL_DATASETS_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME",
                    "TMPDIR")


class FullDisk:
    """A file on a disk that fills up: the first bytes go through, then every write fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def fileno(self):
        return self.f.fileno()

    def write(self, data):
        self.f.write(data[:10])
        self.f.flush()
        raise OSError(errno.ENOSPC, FULL)


def disk_full_at(monkeypatch, name):
    """Make the disk fill up while the file called ``name`` is written (through its temp file ``.name.*``)."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        return FullDisk(f) if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}.") else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def fault_line(result):
    """The one stderr line of a fault: exit code 1, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert (result.exit_code, len(lines)) == (1, 1) and "Traceback" not in result.output, result.output
    return lines[0]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def hidden(folder):
    return sorted(p.name for p in Path(folder).rglob(".*"))


def make_config(tmp_path, tasks=("vtprune_textvqa_mini",)):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "run", "model": {"path": "tiny:llava"}, "eval": {
        "tasks": list(tasks), "generation": {"max_new_tokens": 2}}}))
    return path


def make_image(tmp_path):
    path = tmp_path / "i.png"
    Image.new("RGB", (32, 32), (200, 100, 0)).save(path)
    return path


# A full disk


@pytest.mark.parametrize("write", [
    lambda path: write_jsonl(path, [{"a": 1}, {"b": "x" * 100}]),
    lambda path: write_json(path, {"a": list(range(100))}),
], ids=["jsonl", "json"])
@pytest.mark.parametrize("before", [None, "old contents\n"], ids=["new", "replacing"])
def test_a_full_disk_leaves_the_old_file_or_none(tmp_path, monkeypatch, write, before):
    path = tmp_path / "out.jsonl"
    if before is not None:
        path.write_text(before)
    disk_full_at(monkeypatch, path.name)
    with pytest.raises(OSError) as error:
        write(path)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(path))
    assert (path.read_text() if path.exists() else None) == before
    assert hidden(tmp_path) == []


def test_a_full_disk_during_eval_is_one_line_and_the_run_is_not_finished(tmp_path, monkeypatch):
    """A run finished earlier in the same folder must not vouch for the files of one that failed half-way."""
    config, out = make_config(tmp_path), tmp_path / "results"
    assert invoke("eval", "-c", config, "--limit", "1", "-o", out).exit_code == 0
    assert is_complete(out / "run")
    for name in ("metrics.jsonl", "run.json"):
        with monkeypatch.context() as patch:
            disk_full_at(patch, name)
            line = fault_line(invoke("eval", "-c", config, "--limit", "1", "-o", out))
        assert line == f"error: no space left on device writing {out / 'run' / name} (free some space, then run the " \
                       "same command again)"
        assert not is_complete(out / "run") and not (out / "run" / "run.json").exists()
        assert hidden(out) == []


def test_a_full_disk_writing_the_show_image(tmp_path, monkeypatch):
    out = tmp_path / "kept.png"
    disk_full_at(monkeypatch, out.name)
    line = fault_line(invoke("show", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?", "-o", out))
    assert line == f"error: no space left on device writing {out} (free some space, then run the same command again)"
    assert not out.exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("message", ["No space left on device (os error 28)", "Disk quota exceeded"])
def test_a_full_disk_named_only_in_a_library_message(tmp_path, monkeypatch, message):
    """safetensors and others wrap the OSError in their own error, its text the only trace."""
    import vtprune

    def load(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, FULL)
        except OSError:
            raise RuntimeError(f"Error while serializing: IoError({message})") from None

    monkeypatch.setattr(vtprune, "load", load)
    line = fault_line(invoke("generate", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?"))
    assert line == "error: no space left on device (free some space, then run the same command again)"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("VTPRUNE_DEBUG", "1")
    out = tmp_path / "kept.png"
    disk_full_at(monkeypatch, out.name)
    result = invoke("show", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?", "-o", out)
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.ENOSPC


def test_other_errors_keep_their_traceback(tmp_path, monkeypatch):
    import vtprune

    def load(*args, **kwargs):
        raise OSError(errno.ENOENT, "a bug, not the machine")

    monkeypatch.setattr(vtprune, "load", load)
    result = invoke("generate", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?")
    assert isinstance(result.exception, FileNotFoundError)


# A cache or home folder that cannot be written. CI runs as root, which ignores permissions: a path below a regular
# file is what no user can write.


@pytest.fixture
def blocked(tmp_path, monkeypatch):
    for name in FOLDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    block = tmp_path / "a-file"
    block.write_text("not a folder\n")
    return block


@pytest.mark.parametrize("command", ["generate", "show", "eval"])
@pytest.mark.parametrize("where", ["below", "itself"])
def test_an_unwritable_vtprune_cache(tmp_path, monkeypatch, blocked, command, where):
    cache = blocked / "cache" if where == "below" else blocked
    monkeypatch.setenv("VTPRUNE_CACHE", str(cache))
    extra = {"generate": ["--image", make_image(tmp_path), "-q", "?"], "eval": ["-o", tmp_path / "out"],
             "show": ["--image", make_image(tmp_path), "-q", "?", "-o", tmp_path / "out" / "kept.png"]}[command]
    line = fault_line(invoke(command, "-c", make_config(tmp_path), *extra))
    assert line == (f"error: VTPRUNE_CACHE: cannot use {cache / 'tiny'}: Not a directory (set VTPRUNE_CACHE to a "
                    "writable folder)")
    assert not (tmp_path / "out").exists()


def test_a_file_where_the_cache_needs_a_folder(tmp_path, monkeypatch, blocked):
    """The tiny model is cached, but the mini tasks' folder is a file."""
    from vtprune.models.tiny import tiny_path

    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path / "cache"))
    tiny_path("llava")
    (tmp_path / "cache" / "mini").write_text("")
    line = fault_line(invoke("eval", "-c", make_config(tmp_path), "-o", tmp_path / "out"))
    assert line == (f"error: VTPRUNE_CACHE: cannot use {tmp_path / 'cache' / 'mini'}: File exists (set VTPRUNE_CACHE "
                    "to a writable folder)")
    assert not is_complete(tmp_path / "out" / "run")


def test_an_unwritable_home_for_the_default_cache(tmp_path, monkeypatch, blocked):
    home = blocked / "home"
    monkeypatch.setenv("HOME", str(home))
    line = fault_line(invoke("generate", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?"))
    assert line == (f"error: HOME: cannot use {home / '.cache' / 'vtprune' / 'tiny'}: Not a directory (set HOME to a "
                    "writable folder, or VTPRUNE_CACHE and HF_HOME)")


def test_an_unwritable_home_for_the_datasets_cache(tmp_path, monkeypatch, blocked):
    """lmms-eval makes the Hugging Face datasets cache under HOME even for vtprune's local mini tasks. In a process of
    its own: libraries keep the cache folder they found first."""
    import subprocess
    import sys

    home = blocked / "home"
    env = {**os.environ, "HOME": str(home), "VTPRUNE_CACHE": os.environ.get("VTPRUNE_CACHE", str(tmp_path / "cache"))}
    for name in FOLDER_VARIABLES[1:]:
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "vtprune", "eval", "-c", str(make_config(tmp_path)), "--limit", "1",
                             "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: HOME: cannot use {home}")
    assert lines[0].endswith(": Not a directory (set HOME to a writable folder, or VTPRUNE_CACHE and HF_HOME)")
    assert not is_complete(tmp_path / "out" / "run")


# Files honour the umask: others may read a shared results folder or cache


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_results_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_json(tmp_path / "run.json", {"a": 1})
    write_jsonl(tmp_path / "new" / "metrics.jsonl", [{"a": 1}])
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "new" / "metrics.jsonl").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_show_image_honours_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "kept.png"
    result = invoke("show", "-c", make_config(tmp_path), "--image", make_image(tmp_path), "-q", "?", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
