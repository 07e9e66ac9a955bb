"""The cache of tiny models and mini task data (issue 34): an entry records its files' sizes and sha256 when built,
a damaged one is rebuilt with one note, and the hidden folders of killed builds are cleaned up."""

import json
import os
import socket
import time

import pytest

from vtprune.models import tiny
from vtprune.models.tiny import MANIFEST, cached, remove_stale


def builder(calls):
    def build(out):
        calls.append(out)
        (out / "weights.bin").write_bytes(bytes(range(256)) * 40)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"a": 1}\n')

    return build


@pytest.fixture
def fresh(monkeypatch):
    """A new process's view: nothing hashed yet."""
    monkeypatch.setattr(tiny, "_hashed", set())


def test_an_entry_records_size_and_sha256_of_every_file(tmp_path, fresh):
    import hashlib

    calls = []
    target = cached(tmp_path / "thing-v1", builder(calls), "thing")
    files = json.loads((target / MANIFEST).read_text())["files"]
    assert sorted(files) == ["sub/config.json", "weights.bin"]
    for name, entry in files.items():
        data = (target / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tiny._hashed.clear()
    assert cached(target, builder(calls), "thing") == target and len(calls) == 1  # a sound entry is not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["thing-v1"]


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = [
    ("cut short", lambda t: truncate(t / "weights.bin"), "weights.bin has 100 bytes, 10240 were written"),
    ("emptied", lambda t: (t / "sub" / "config.json").write_bytes(b""), "sub/config.json has 0 bytes, 9 were written"),
    ("same size, other bytes", lambda t: flip(t / "weights.bin"),
     "weights.bin does not match the sha256 recorded when it was written"),
    ("a file gone", lambda t: (t / "weights.bin").unlink(), "weights.bin is missing"),
    ("a folder in place of a file", lambda t: ((t / "weights.bin").unlink(), (t / "weights.bin").mkdir()),
     "weights.bin is missing"),
    ("manifest cut short", lambda t: truncate(t / MANIFEST), f"{MANIFEST} is not readable"),
    ("manifest of another shape", lambda t: (t / MANIFEST).write_text('["weights.bin"]'), f"{MANIFEST} is not readable"),
]


@pytest.mark.parametrize("label,damage,problem", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_entry_is_rebuilt_with_one_note(tmp_path, fresh, capsys, label, damage, problem):
    calls = []
    target = cached(tmp_path / "thing-v1", builder(calls), "thing")
    good = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    damage(target)
    tiny._hashed.clear()
    capsys.readouterr()
    assert cached(target, builder(calls), "thing") == target and len(calls) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"note: thing: the cached copy in {target} is damaged ({problem}); rebuilding it"]
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == good
    assert [p.name for p in tmp_path.iterdir()] == ["thing-v1"]  # nothing left beside it


def test_sizes_are_checked_on_every_use_hashes_once_per_process(tmp_path, fresh):
    calls = []
    target = cached(tmp_path / "thing-v1", builder(calls), "thing")
    flip(target / "weights.bin")
    assert cached(target, builder(calls), "thing") == target and len(calls) == 1  # hashed when built, this process
    truncate(target / "weights.bin")
    assert cached(target, builder(calls), "thing") == target and len(calls) == 2


def test_an_entry_of_an_older_vtprune_is_rebuilt_quietly(tmp_path, fresh, capsys):
    """An entry without a manifest was written before manifests: rebuilt, without calling it damaged."""
    calls = []
    old = tmp_path / "thing-v1"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"cut")
    cached(old, builder(calls), "thing")
    assert len(calls) == 1 and (old / MANIFEST).is_file() and (old / "weights.bin").stat().st_size == 10240
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError, RuntimeError])
def test_a_failed_build_leaves_nothing(tmp_path, fresh, error):
    def build(out):
        builder([])(out)
        raise error()

    with pytest.raises(error):
        cached(tmp_path / "thing-v1", build, "thing")
    assert list(tmp_path.iterdir()) == []


def stale_folder(parent, name, age=0):
    path = parent / name
    path.mkdir(parents=True)
    (path / "half.bin").write_bytes(b"x")
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def dead_pid():
    pid = 4_000_000  # above Linux's largest pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_killed_builds_are_cleaned_up_by_the_next(tmp_path, fresh):
    host = socket.gethostname()
    gone = [
        stale_folder(tmp_path, f".thing-v1.{dead_pid()}@{host}-abcd1234"),  # its process is gone
        stale_folder(tmp_path, f".other-v2.{dead_pid()}@{host}-a_b_c_d1-old"),  # a damaged entry moved aside
        stale_folder(tmp_path, f".thing-v1.{os.getpid()}@other-host-abcd1234", age=2 * 3600),  # old, wherever made
        stale_folder(tmp_path, ".thing-xyz_1234", age=2 * 3600),  # an older vtprune's name
        stale_folder(tmp_path, ".textvqa-v3.abcd1234", age=3 * 3600),
    ]
    kept = [
        stale_folder(tmp_path, f".thing-v1.{os.getpid()}@{host}-abcd1234"),  # a build still running here
        stale_folder(tmp_path, f".thing-v1.{dead_pid()}@other-host-abcd1234", age=600),  # another machine's, recent
        stale_folder(tmp_path, ".thing-xyz_1234b", age=60),  # recent: it may still be building
    ]
    cached(tmp_path / "thing-v1", builder([]), "thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + ["thing-v1"])
    assert not any(p.exists() for p in gone)


def test_remove_stale_removes_a_stale_file_too(tmp_path):
    path = tmp_path / f".thing-v1.{dead_pid()}@{socket.gethostname()}-abcd1234-old"
    path.write_bytes(b"x")
    remove_stale(tmp_path)
    assert not path.exists()


# The real entries: the tiny model and a mini task's data


@pytest.fixture
def cache(tmp_path, monkeypatch, fresh):
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("damage,problem", [
    (truncate, "model.safetensors has 100 bytes, {size} were written"),
    (flip, "model.safetensors does not match the sha256 recorded when it was written"),
], ids=["cut short", "other bytes"])
def test_a_damaged_tiny_model_is_rebuilt_and_loads(tmp_path, cache, damage, problem):
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from vtprune.cli import app

    target = tiny.tiny_path("llava")
    size = (target / "model.safetensors").stat().st_size
    damage(target / "model.safetensors")
    tiny._hashed.clear()
    config, image = tmp_path / "c.yaml", tmp_path / "i.png"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}}))
    Image.new("RGB", (32, 32)).save(image)
    result = CliRunner().invoke(app, ["generate", "-c", str(config), "--image", str(image), "-q", "?",
                                      "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if "damaged" in line] == [
        f"note: tiny:llava: the cached copy in {target} is damaged ({problem.format(size=size)}); rebuilding it"]
    assert tiny.entry_problem(target) is None


def test_a_damaged_mini_dataset_is_rebuilt(cache, capsys):
    import datasets

    from vtprune.eval.mini import mini_dataset_path

    target = mini_dataset_path("vtprune_vqav2_mini")
    arrow = next(target.rglob("*.arrow"))
    truncate(arrow)
    tiny._hashed.clear()
    capsys.readouterr()
    assert mini_dataset_path("vtprune_vqav2_mini") == target
    assert capsys.readouterr().err.startswith(
        f"note: vtprune_vqav2_mini: the cached copy in {target} is damaged ({arrow.relative_to(target)} has 100 bytes")
    assert len(datasets.load_from_disk(str(target))["validation"]) == 48


def test_cache_entries_honour_the_umask(tmp_path, fresh):
    saved = os.umask(0o027)
    try:
        target = cached(tmp_path / "thing-v1", builder([]), "thing")
    finally:
        os.umask(saved)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [target, *target.rglob("*")]}
    assert modes == {"thing-v1": 0o750, "sub": 0o750, "config.json": 0o640, "weights.bin": 0o640, MANIFEST: 0o640}
