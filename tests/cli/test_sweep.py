"""``vtprune sweep ratios``: shards, skipping finished points, redoing partial ones."""

import json

import yaml
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.results import is_complete, read_jsonl


def sweep(config, out, *extra):
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "1.0,0.5", "--limit", "2", "-o", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_sweep_shards_skips_finished_points_and_redoes_partial_ones(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
        "eval": {"tasks": ["vtprune_vqav2_mini"], "generation": {"max_new_tokens": 2, "do_sample": False}},
    }))
    out = tmp_path / "results"
    ref, pruned = out / "s" / "none-1.0", out / "s" / "uniform-0.5"

    assert "1 points in this shard, 1 to run" in sweep(config, out, "--shard", "0/2").stderr
    assert is_complete(ref) and not pruned.exists()
    sweep(config, out, "--shard", "1/2")
    assert is_complete(pruned)
    rows = {p.name: read_jsonl(p / "metrics.jsonl")[0] for p in (ref, pruned)}
    assert rows["none-1.0"]["run"] == "none-1.0" and rows["none-1.0"]["kept_fraction_mean"] == 1.0
    assert rows["uniform-0.5"]["run"] == "uniform-0.5" and rows["uniform-0.5"]["kept_fraction_mean"] == 0.5

    stamps = {p: (p / "run.json").stat().st_mtime_ns for p in (ref, pruned)}
    assert "2 points in this shard, 0 to run" in sweep(config, out).stderr
    assert {p: (p / "run.json").stat().st_mtime_ns for p in (ref, pruned)} == stamps

    (pruned / "run.json").unlink()  # as if killed before the point finished
    result = sweep(config, out)
    assert "2 points in this shard, 1 to run" in result.stderr
    assert is_complete(pruned) and (ref / "run.json").stat().st_mtime_ns == stamps[ref]


def test_sweep_bad_ratio_is_one_line(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny:llava"}}))
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "0.5,1.5", "-o", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --ratios: 1.5 is outside the allowed range (0, 1]"
    assert not (tmp_path / "r").exists()


def test_sweep_bench_writes_bench_rows_and_needs_them_to_skip(tmp_path):
    config = tmp_path / "b.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "tiny:llava"}, "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
        "eval": {"tasks": ["vtprune_vqav2_mini"], "generation": {"max_new_tokens": 2, "do_sample": False}},
        "bench": {"batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 2, "warmup": 0, "repeats": 1},
    }))
    out = tmp_path / "results"
    args = ["sweep", "ratios", "-c", str(config), "--ratios", "0.5", "--limit", "1", "-o", str(out), "--bench"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pruned = out / "b" / "uniform-0.5"
    for point in (out / "b" / "none-1.0", pruned):
        assert is_complete(point) and read_jsonl(point / "metrics.jsonl") and read_jsonl(point / "bench.jsonl")
        meta = json.loads((point / "run.json").read_text())
        assert meta["kind"] == "eval+bench" and meta["tasks"] == ["vtprune_vqav2_mini"] and meta["weights"] == "pretrained"
    (pruned / "bench.jsonl").unlink()  # eval finished, bench did not
    result = CliRunner().invoke(app, args)
    assert "2 points in this shard, 1 to run" in result.stderr
    assert read_jsonl(pruned / "bench.jsonl")[0]["keep_ratio"] == 0.5
