"""scripts/profile_prefill.py on a tiny model: one row per point and round, none first as the reference, the
matrix multiplies' FLOPs falling with pruning; bad input refused with exit code 2 before anything runs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke" / "tiny-llava-adav.yaml")


def _script():
    spec = importlib.util.spec_from_file_location("profile_prefill", ROOT / "scripts" / "profile_prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| round")]


def test_rows_per_point_and_round_with_matmul_flops_from_the_profiler(capsys):
    assert _script().main(["--config", SMOKE, "--strategies", "uniform", "--ratio", "0.25", "--rounds", "2"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "none", "1"), ("1", "uniform", "0.25"),
                                                  ("2", "none", "1"), ("2", "uniform", "0.25")]
    none, uniform = rows[0], rows[1]
    assert none[8:] == ["1.00×", "1.00×", "1.00×"]
    # uniform keeps a quarter of the visual tokens: its language-model products shrink, the vision tower's do not
    assert 0 < float(uniform[6]) < float(none[6])
    assert float(uniform[10].rstrip("×")) > 1
    assert rows[2][6] == none[6] and rows[3][6] == uniform[6]  # FLOPs are counted, not timed: the same every round


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    script = _script()
    assert script.main(["--config", SMOKE, "--strategies", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'bogus'" in err and "allowed:" in err and len(err.strip().splitlines()) == 1
    assert script.main(["--config", SMOKE, "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
