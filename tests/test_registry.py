import pytest
from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.errors import ConfigError
from vtprune.registry import Registry
from vtprune.strategies import STRATEGIES


def test_registry_refuses_duplicates_and_lists_known_names():
    reg = Registry("widget", "x.widget")
    reg.add("b", 1)
    reg.add("a", 2)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", 3)
    with pytest.raises(ConfigError, match=r"x.widget: unknown widget 'c' \(allowed: a, b\)"):
        reg.get("c")


def test_foundation_strategies_are_registered():
    assert {"none", "random", "uniform"} <= set(STRATEGIES.names())


@pytest.mark.parametrize("what,expected", [
    ("strategies", ["none ", "random ", "uniform "]),
    ("models", ["llava "]),
    ("tasks", ["vtprune_textvqa_mini ", "textvqa_val ", "llava_in_the_wild "]),
])
def test_list_prints_names_with_descriptions(what, expected):
    result = CliRunner().invoke(app, ["list", what])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for prefix in expected:
        line = next(line for line in lines if line.startswith(prefix))
        assert len(line.split(None, 1)) == 2  # a description follows the name


def test_list_unknown_kind():
    result = CliRunner().invoke(app, ["list", "gadgets"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: list: unknown 'gadgets' (allowed: strategies, models, tasks)"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from vtprune.cli import app; sys.argv=['vtprune','--help']\ntry:\n app()\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'lmms_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_list_strategies_says_where_each_prunes_and_its_kind():
    lines = {line.split()[0]: line for line in CliRunner().invoke(app, ["list", "strategies"]).stdout.splitlines()}
    assert "[pre-LLM; internvl, llava, llava_next, llava_onevision, qwen2_5_vl]" in lines["adav"]
    assert "[in-LLM; internvl, llava, llava_next, llava_onevision, qwen2_5_vl] placement: layer=2" in lines["fastv"]
    assert "[in-LLM, multi-stage; internvl, llava, llava_next, llava_onevision, qwen2_5_vl] placement: layers=" in lines["pdrop"]
    assert "[pre-LLM, merge; internvl, llava, llava_next, llava_onevision, qwen2_5_vl] options:" in lines["visionzip"]
    assert "[mllama: after the 1st cross-attention layer; mllama]" in lines["trimmed_llama"]
    assert "[pre-LLM; mllama: after the 1st cross-attention layer; all families]" in lines["uniform"]
    assert "[nothing pruned; all families]" in lines["none"]
