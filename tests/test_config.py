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
    ("unknown top-level key", {**GOOD, "modle": {}}, "modle: unknown key (allowed: name, model, pruning, eval, bench, output_dir, seed, engine)"),
    ("unknown engine", {**GOOD, "engine": "tgi"}, "engine: 'tgi' is not allowed (allowed: hf, vllm)"),
    ("in-LLM strategy on vllm", {**with_("pruning", strategy="fastv"), "engine": "vllm"},
     "pruning.strategy: 'fastv' cannot run on vLLM: it prunes inside the LLM (vLLM's paged KV cache gives every layer one length) (allowed on vllm: adav,"),
    ("vision-tower strategy on vllm", {**with_("pruning", strategy="tome"), "engine": "vllm"},
     "pruning.strategy: 'tome' cannot run on vLLM: it merges inside the vision tower, which vtprune's vLLM model runs "
     "as vLLM's own (allowed on vllm: adav,"),
    ("a strategy that may keep fewer than the budget on vllm", {**with_("pruning", strategy="pool"), "engine": "vllm"},
     "pruning.strategy: 'pool' cannot run on vLLM: it may keep fewer tokens than the budget, and the prompt vLLM "
     "schedules holds one placeholder per token of the budget before the model runs (allowed on vllm: adav,"),
    ("prumerge's adaptive count on vllm",
     {**with_("pruning", strategy="prumerge", options={"mode": "adaptive"}), "engine": "vllm"},
     "pruning.strategy: 'prumerge' cannot run on vLLM: it may keep fewer tokens than the budget"),
    ("family vllm does not serve", {**with_("model", path="tiny:mllama"), "engine": "vllm"},
     "engine: 'vllm' does not run model family 'mllama' (allowed: llava, llava_next, llava_onevision, qwen2_5_vl)"),
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


# YAML that is valid but must not be taken: alias bombs and duplicate keys.


def laughs(depth, width=9):
    """A billion-laughs document: each level an anchored list of ``width`` aliases of the one below."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{d}: &l{d} [{', '.join([f'*l{d - 1}'] * width)}]" for d in range(1, depth + 1)]
    return lines


def expanding(field_line):
    """A config whose ``field_line`` (at the top level) takes the bomb's last level."""
    return "\n".join(["model: {path: 'tiny:llava'}", "anchors:", *("  " + line for line in laughs(9)), field_line])


BOMBS = [
    ("in a field whose error reprs its value", expanding("eval: {tasks: *l9}")),
    ("in an unknown key", expanding("extra: *l9")),
    ("in a strategy option", expanding("pruning: {strategy: adav, options: {budget_thres: *l9}}")),
    ("in bench sizes", expanding("bench: {batch_sizes: *l9}")),
    ("wide and shallow", "\n".join(["model: {path: 'tiny:llava'}", "anchors:", *("  " + line for line in laughs(3, 30)),
                                    "seed: [" + ", ".join(["*l3"] * 30) + "]"])),
    ("recursive", "model: {path: 'tiny:llava'}\nbench: {batch_sizes: &x [1, *x]}\n"),
]


@pytest.mark.parametrize("label,text", BOMBS, ids=[b[0] for b in BOMBS])
def test_alias_bomb_is_refused_at_once(tmp_path, label, text):
    import time

    path = write(tmp_path, text)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: config: {path} expands its YAML aliases into more than 10000 values "
                                     "(an alias bomb?; allowed: at most 10000 values made by aliases)")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


def test_a_few_aliases_are_fine(tmp_path):
    text = "model: &m {path: 'tiny:llava'}\neval: {tasks: &t [vtprune_textvqa_mini]}\nbench: {batch_sizes: &b [1, 2]}\n"
    text += "pruning: {keep_ratio: &r 0.5}\nx: [*m, *t, *b, *r]\n"
    with pytest.raises(ConfigError, match="^x: unknown key"):  # the aliases themselves are taken
        load_config(write(tmp_path, text))
    config = load_config(write(tmp_path, text.replace("x:", "seed: 3\n#")))
    assert config.eval.tasks == ["vtprune_textvqa_mini"] and config.pruning.keep_ratio == 0.5


@pytest.mark.parametrize("value,shown", [
    ("[" + ", ".join(["'" + "x" * 50 + "'"] * 2000) + "]", "seed: expected an integer, got ['xxxxx"),
    ("{" + ", ".join(f"k{i}: [1, 2, 3]" for i in range(3000)) + "}", "seed: expected an integer, got {'k0': [1, 2, 3], "),
    ('"' + "line\\n" * 5000 + '"', "seed: expected an integer, got 'line\\nline\\n"),
])
def test_a_large_value_is_shown_short_on_one_line(tmp_path, value, shown):
    """Below the alias bound a value can still be big: an error line shows it cut, on one line."""
    path = write(tmp_path, f"model: {{path: 'tiny:llava'}}\nseed: {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = str(error.value)
    assert line.startswith(shown) and "\n" not in line and len(line) < 250, line


DUPLICATES = [
    ("top level", "model: {path: 'tiny:llava'}\nseed: 1\nseed: 2\n", "seed: duplicate key at line 3 of {p} (first at line 2; allowed: each key once)"),
    ("nested block", "model: {path: 'tiny:llava'}\npruning:\n  strategy: uniform\n  keep_ratio: 0.5\n  keep_ratio: 0.25\n",
     "pruning.keep_ratio: duplicate key at line 5 of {p} (first at line 4; allowed: each key once)"),
    ("a whole section", "model: {path: 'tiny:llava'}\nmodel: {path: 'tiny:mllama'}\n",
     "model: duplicate key at line 2 of {p} (first at line 1; allowed: each key once)"),
    ("flow mapping", "model: {path: 'tiny:llava', path: 'tiny:mllama'}\n",
     "model.path: duplicate key at line 1 of {p} (first at line 1; allowed: each key once)"),
    ("inside options", "model: {path: 'tiny:llava'}\npruning:\n  strategy: adav\n  options:\n    budget_thres: 0.1\n    budget_thres: 0.2\n",
     "pruning.options.budget_thres: duplicate key at line 6 of {p} (first at line 5; allowed: each key once)"),
    ("generation", "model: {path: 'tiny:llava'}\neval:\n  generation: {max_new_tokens: 4, max_new_tokens: 8}\n",
     "eval.generation.max_new_tokens: duplicate key at line 3 of {p} (first at line 3; allowed: each key once)"),
]


@pytest.mark.parametrize("label,text,message", DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_duplicate_keys_are_refused(tmp_path, label, text, message):
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: " + message.format(p=path)
    assert not (tmp_path / "out").exists()


def test_every_config_key_is_documented_and_every_documented_key_exists():
    # docs/reference/config.md is generated from CONFIG_DOCS and the dataclasses: neither may drift from the other
    import dataclasses

    from vtprune.config import CONFIG_DOCS, Config

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(nested):
                yield from keys(nested, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    assert list(keys(Config)) == list(CONFIG_DOCS)
    assert all(meaning is not None and allowed for allowed, meaning in CONFIG_DOCS.values())
