"""``vtprune cost`` / ``vtprune bench`` tables fit 120 columns; ``--wide`` shows every column."""

from typer.testing import CliRunner

from vtprune.cli import app
from vtprune.cli.bench import ESSENTIAL, WIDE, _print_table

ARCH = "configs/architectures/llama-3.2-11b-vision.yaml"


def cost(*extra):
    result = CliRunner().invoke(app, ["cost", "-c", ARCH, "--batch-sizes", "1,8,32", "--ratios", "1.0,0.25",
                                      "--strategies", "trimmed_llama,cls_saliency", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_cost_fits_120_columns_and_wide_shows_every_column():
    lines = cost()
    assert max(len(line) for line in lines) <= 120
    assert "6404 visual and 64 text tokens" in lines[0]  # the same for every row: in the title, not a column
    header = " ".join(line for line in lines if line.startswith("┃"))
    assert "KV self MiB" in header and "KV cross MiB" in header
    assert "prefill" not in header and "KV total" not in header and "visual" not in header
    assert sum(line.startswith("│ trimmed_llama ") for line in lines) == 6  # names whole, never cut

    wide = cost("--wide")
    assert max(len(line) for line in wide) > 120
    header = " ".join(line for line in wide if "strategy" in line or "TFLOPs" in line)
    for column in ("KV self", "KV cross", "prefill", "vision", "decode"):
        assert column in header


def test_worst_case_bench_cells_stay_whole_in_120_columns(capsys):
    row = {"strategy": "a_rather_long_strategy", "keep_ratio": 0.25, "batch_size": 16, "kept_fraction_mean": 0.25,
           "ttft_ms": 123456.7, "decode_ms_per_token": 1234.56, "peak_memory_bytes": 2**40}
    cell = "1.60× / 2.05× (178 %, above ideal)"
    columns = [
        ("strategy", "strategy", str, ESSENTIAL), ("keep", "keep_ratio", "{:g}", ESSENTIAL),
        ("batch", "batch_size", str, ESSENTIAL), ("kept", "kept_fraction_mean", "{:.3f}", ESSENTIAL),
        ("TTFT ms", "ttft_ms", "{:.1f}", ESSENTIAL), ("decode ms/tok", "decode_ms_per_token", "{:.2f}", ESSENTIAL),
        ("TTFT ×ideal", None, lambda r: cell, ESSENTIAL), ("decode ×ideal", None, lambda r: cell, ESSENTIAL),
        ("peak MiB", "peak_memory_bytes", "{}", ESSENTIAL), ("select ms", "select_ms", "{:.2f}", WIDE),
    ]
    _print_table([row], columns, title="t")
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    assert out.count(cell) == 2 and "a_rather_long_strategy" in out and "select" not in out
