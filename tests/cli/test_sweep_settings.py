"""``vtprune sweep ratios`` reuses a finished point only when it was made with the settings asked for now."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.results import is_complete, read_jsonl

BASE = {
    "model": {"path": "tiny:llava"},
    "pruning": {"strategy": "dart", "keep_ratio": 0.5, "options": {"pivot_image_token": 4}, "placement": {"layer": 1}},
    "eval": {"tasks": ["vtprune_vqav2_mini"], "generation": {"max_new_tokens": 2, "do_sample": False}},
    "seed": 0,
}


def invoke(config, out, *extra):
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "0.5", "--limit", "1", "-o", str(out), *extra]
    return CliRunner().invoke(app, args)


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-point sweep (none-1.0, dart-0.5) at --limit 1."""
    root = tmp_path_factory.mktemp("sweep")
    config, out = write(root / "s.yaml", BASE), root / "results"
    result = invoke(config, out)
    assert result.exit_code == 0, result.output
    return config, out


def changed(section, key, value):
    data = json.loads(json.dumps(BASE))
    (data.setdefault(section, {}) if section else data)[key] = value
    return data


@pytest.mark.parametrize("config_change, extra, named", [
    (None, ["--limit", "2"], "eval.limit 1 there, 2 asked"),
    (changed("eval", "tasks", ["vtprune_textvqa_mini"]), [],
     'eval.tasks ["vtprune_vqav2_mini"] there, ["vtprune_textvqa_mini"] asked'),
    (changed("model", "path", "tiny:llava_next"), [], 'model.path "tiny:llava" there, "tiny:llava_next" asked'),
    (changed("model", "dtype", "bfloat16"), [], 'model.dtype "auto" there, "bfloat16" asked'),
    (changed("eval", "generation", {"max_new_tokens": 3, "do_sample": False}), [],
     "eval.generation.max_new_tokens 2 there, 3 asked"),
    (changed(None, "seed", 1), [], "seed 0 there, 1 asked"),
])
def test_a_finished_point_made_otherwise_is_refused_naming_the_difference(finished, tmp_path, config_change, extra,
                                                                         named):
    config, out = finished
    if config_change is not None:
        config = write(tmp_path / "s.yaml", config_change)  # same name: the same sweep folder
    before = snapshot(out)
    result = invoke(config, out, *extra)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: sweep point {out / 's' / 'none-1.0'} was made with other")
    assert named in line and "pass --force" in line
    assert snapshot(out) == before  # nothing written, nothing loaded


@pytest.mark.parametrize("key, value, named", [
    ("options", {"pivot_image_token": 8}, "pruning.options.pivot_image_token 4 there, 8 asked"),
    ("options", {"pivot_image_token": 4, "norm": "l2"}, 'pruning.options.norm null there, "l2" asked'),
    ("placement", {"layer": 2}, "pruning.placement.layer 1 there, 2 asked"),
])
def test_options_and_placement_of_the_pruned_point_count(finished, tmp_path, key, value, named):
    _, out = finished
    data = json.loads(json.dumps(BASE))
    data["pruning"][key] = value
    before = snapshot(out)
    result = invoke(write(tmp_path / "s.yaml", data), out)
    assert result.exit_code == 2, result.output
    # none-1.0 runs with no options of dart: only the dart point differs.
    assert f"sweep point {out / 's' / 'dart-0.5'} was made" in result.stderr and named in result.stderr
    assert "more points" not in result.stderr
    assert snapshot(out) == before


def test_another_vtprune_version_is_a_difference(finished, monkeypatch):
    import vtprune.results

    config, out = finished
    real = vtprune.results.versions
    monkeypatch.setattr(vtprune.results, "versions", lambda: {**real(), "vtprune": "0.0.0-other"})
    result = invoke(config, out)
    assert result.exit_code == 2
    assert '"0.0.0-other" asked' in result.stderr and "and 1 more points" in result.stderr


def test_same_settings_reuse_every_point_and_load_nothing(finished):
    config, out = finished
    before = snapshot(out)
    result = invoke(config, out)
    assert result.exit_code == 0, result.output
    assert "2 points in this shard, 0 to run, 2 reused" in result.stderr
    assert snapshot(out) == before


def test_force_reruns_with_the_new_settings_and_an_interrupted_rerun_keeps_the_old_point(tmp_path, monkeypatch):
    from vtprune.eval import runner

    config, out = write(tmp_path / "s.yaml", BASE), tmp_path / "results"
    assert invoke(config, out).exit_code == 0
    ref, pruned = out / "s" / "none-1.0", out / "s" / "dart-0.5"

    real = runner.run_eval

    def interrupted(pipe, **kwargs):
        real(pipe, **kwargs)  # the new point is complete in the staging folder...
        raise KeyboardInterrupt  # ...but the process dies before it is moved in place

    monkeypatch.setattr(runner, "run_eval", interrupted)
    result = invoke(config, out, "--limit", "2", "--force")
    assert result.exit_code == 130
    assert is_complete(ref) and len(read_jsonl(ref / "samples.jsonl")) == 1  # the old point, whole
    assert json.loads((ref / "run.json").read_text())["limit"] == 1

    monkeypatch.setattr(runner, "run_eval", real)
    result = invoke(config, out, "--limit", "2", "--force")
    assert result.exit_code == 0, result.output
    assert "2 to run" in result.stderr
    for point in (ref, pruned):
        assert is_complete(point) and len(read_jsonl(point / "samples.jsonl")) == 2
    assert json.loads((pruned / "run.json").read_text())["fidelity"]["reference"] == "none-1.0"
    assert not (out / "s" / ".partial").exists()


def test_an_unfinished_point_is_rerun_whatever_its_settings(tmp_path):
    config, out = write(tmp_path / "s.yaml", BASE), tmp_path / "results"
    assert invoke(config, out).exit_code == 0
    pruned = out / "s" / "dart-0.5"
    (pruned / "run.json").unlink()  # killed before it finished
    data = json.loads(json.dumps(BASE))
    data["seed"] = 3
    result = invoke(write(config, data), out)  # none-1.0 is finished with seed 0: refused; dart-0.5 would rerun
    assert result.exit_code == 2 and "none-1.0 was made with other settings (seed 0 there, 3 asked)" in result.stderr
    result = invoke(write(config, BASE), out)
    assert result.exit_code == 0, result.output
    assert "1 to run, 1 reused" in result.stderr and is_complete(pruned)


def test_bench_settings_count_with_bench(tmp_path):
    data = {**BASE, "bench": {"batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1}}
    config, out = write(tmp_path / "s.yaml", data), tmp_path / "results"
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "1.0", "--limit", "1", "-o", str(out), "--bench"]
    assert CliRunner().invoke(app, args).exit_code == 0
    data["bench"]["repeats"] = 2
    write(config, data)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "bench.repeats 1 there, 2 asked" in result.stderr
    # Without --bench the eval settings alone decide: the point is reused.
    result = CliRunner().invoke(app, args[:-1])
    assert result.exit_code == 0 and "0 to run, 1 reused" in result.stderr
