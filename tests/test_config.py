"""Config validation: every bad input is one line naming the key and the allowed values, exit 2, nothing written."""

import pytest
import yaml
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.config import load_config
from vtprune.errors import ConfigError

GOOD = {
    "name": "t",
    "model": {"path": "tiny:llava"},
    "pruning": {"strategy": "uniform", "keep_ratio": 0.5},
    "eval": {"tasks": ["vtprune_textvqa_mini"]},
}


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_(section, **values):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    data[section] = {**data.get(section, {}), **values}
    return data


BAD = [
    ("unknown top-level key", {**GOOD, "modle": {}}, "modle: unknown key (allowed: name, model, pruning, eval, bench, output_dir, seed)"),
    ("unknown nested key", with_("model", revision="x"), "model.revision: unknown key (allowed: path, family, weights, dtype, device, attn_implementation)"),
    ("bench threads zero", with_("bench", threads=0), "bench.threads: 0 must be a positive integer or null"),
    ("bench threads not a number", with_("bench", threads="all"), "bench.threads: expected an integer or null, got 'all'"),
    ("unknown strategy", with_("pruning", strategy="magic"), "pruning.strategy: unknown strategy 'magic' (allowed: "),
    ("unknown family", with_("model", family="gpt"), "model.family: 'gpt' is not allowed (allowed: auto, internvl, llava, llava_next, llava_onevision, mllama, qwen2_5_vl)"),
    ("unknown task", with_("eval", tasks=["no_such_task"]), "eval.tasks: unknown task 'no_such_task' ("),
    ("keep ratio zero", with_("pruning", keep_ratio=0), "pruning.keep_ratio: 0.0 is outside the allowed range (0, 1]"),
    ("keep ratio above one", with_("pruning", keep_ratio=1.5), "pruning.keep_ratio: 1.5 is outside the allowed range (0, 1]"),
    ("keep ratio negative", with_("pruning", keep_ratio=-0.2), "pruning.keep_ratio: -0.2 is outside the allowed range (0, 1]"),
    ("undeclared option", with_("pruning", options={"layer": 3}), "pruning.options.layer: strategy 'uniform' has no such option (allowed: none); where it prunes is set by pruning.placement.layer"),
    ("bad weights", with_("model", weights="trained"), "model.weights: 'trained' is not allowed (allowed: pretrained, random)"),
    ("bad dtype", with_("model", dtype="int8"), "model.dtype: 'int8' is not allowed (allowed: auto, float32, float16, bfloat16)"),
    ("bad device", with_("model", device="tpu"), "model.device: 'tpu' is not allowed (allowed: auto, cpu, cuda, cuda:N)"),
    ("bad tiny model", with_("model", path="tiny:qwen"), "model.path: 'tiny:qwen' is not allowed (allowed: tiny:mllama, tiny:llava, tiny:llava_next, tiny:qwen2_5_vl, tiny:llava_onevision, tiny:internvl)"),
    ("option out of range", with_("pruning", strategy="adav", options={"budget_thres": 0.9}), "pruning.options.budget_thres: 0.9 is outside the allowed range [0.0, 0.5]"),
    ("option bad choice", {**GOOD, "model": {"path": "tiny:mllama"}, "pruning": {"strategy": "trimmed_llama", "options": {"mode": "greedy"}}}, "pruning.options.mode: 'greedy' is not allowed (allowed: adaptive, budget)"),
    ("option wrong type", with_("pruning", strategy="trimmed_llama", options={"mode": 2}), "pruning.options.mode: expected str, got 2"),
    ("placement wrong type", with_("pruning", strategy="fastv", placement={"layer": "two"}),
     "pruning.placement.layer: 'two' is not allowed (allowed: an integer in [1, decoder layers - 1])"),
    ("placement of another kind", with_("pruning", strategy="uniform", placement={"layer": 2}),
     "pruning.placement.layer: not a setting of 'uniform', which prunes before the LLM (allowed: none)"),
    ("wrong type", with_("pruning", keep_ratio="half"), "pruning.keep_ratio: expected a number, got 'half'"),
    ("malformed yaml", "model: [unclosed\n", "is not valid YAML"),
    ("not a mapping", "- a\n- b\n", "must be a mapping of keys"),
]


@pytest.mark.parametrize("label,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, label, data, message):
    path = write(tmp_path, data)
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--dry-run", "--output-dir", str(out_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out_dir.exists()


def test_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--config", str(tmp_path / "nope.yaml"), "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: config: file not found: {tmp_path / 'nope.yaml'}"


def test_dry_run_prints_resolved_config(tmp_path):
    path = write(tmp_path, GOOD, "mine.yaml")
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--dry-run", "--limit", "3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["name"] == "t"
    assert resolved["pruning"] == {"strategy": "uniform", "keep_ratio": 0.5, "options": {}, "placement": {}}
    assert resolved["eval"]["limit"] == 3
    assert resolved["bench"]["batch_sizes"] == [1, 4, 16]  # defaults filled in


def test_name_defaults_to_file_stem(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "name"}
    assert load_config(write(tmp_path, data, "my-run.yaml")).name == "my-run"


def test_a_strategy_runs_where_its_signals_are_provided(tmp_path):
    # trimmed_llama needs the first cross-attention layer's scores, which LLaVA (self-attention) cannot give.
    data = with_("pruning", strategy="trimmed_llama")
    with pytest.raises(ConfigError, match=r"^pruning.strategy: 'trimmed_llama' needs the signal 'cross_attention', "
                                          r"which model family 'llava' does not provide inside the LLM \(allowed on "
                                          r"llava: adav, .*\)$") as error:
        load_config(write(tmp_path, data))
    allowed = str(error.value).split("allowed on llava: ")[1].rstrip(")").split(", ")
    assert {"fastv", "pdrop", "pool", "uniform", "none"} <= set(allowed) and "trimmed_llama" not in allowed
    # cls_saliency names no family: LLaVA provides CLS attention, so it runs there too.
    assert load_config(write(tmp_path, with_("pruning", strategy="cls_saliency"))).pruning.strategy == "cls_saliency"


def test_every_strategy_declares_known_signals_and_no_family():
    from vtprune.strategies import STRATEGIES
    from vtprune.strategies.base import SIGNALS, register_strategy

    for _, s in STRATEGIES.items():
        assert set(s.needs) <= set(SIGNALS) and not hasattr(s, "families")
    with pytest.raises(ValueError, match="strategy 'x' needs unknown signal 'nope'"):
        register_strategy("x", needs=("nope",))


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


def test_strategy_needing_llm_features_is_rejected_on_mllama(tmp_path):
    data = {**GOOD, "model": {"path": "tiny:mllama"}, "pruning": {"strategy": "divprune", "keep_ratio": 0.5}}
    with pytest.raises(ConfigError, match="pruning.strategy: 'divprune' needs the signal 'features', which model "
                                          r"family 'mllama' does not provide \(allowed on mllama: cls_saliency, "
                                          r"fastervlm, hired, none, random, trimmed_llama, uniform\)"):
        load_config(write(tmp_path, data))
