"""``vtprune bench`` (measured speed, memory, KV cache) and ``vtprune cost`` (analytic KV cache and FLOPs)."""

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import (
    ConfigOpt,
    OutputDirOpt,
    check_strategies,
    handle_errors,
    load_cli_config,
    parse_list,
    quiet_libraries,
)

BatchSizesOpt = Annotated[str | None, typer.Option("--batch-sizes", help="Comma-separated batch sizes (overrides bench.batch_sizes).")]
StrategiesOpt = Annotated[str | None, typer.Option("--strategies", help="Comma-separated strategies (default: pruning.strategy).")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column, however wide (default: the essentials, in 120 columns).")]
TABLE_WIDTH = 120


def _ratios_opt(default: str):
    return typer.Option("--ratios", help=f"Comma-separated keep ratios in (0, 1] (default: {default}).")


@app.command()
@handle_errors
def bench(
    config: ConfigOpt,
    batch_sizes: BatchSizesOpt = None,
    ratios: Annotated[str | None, _ratios_opt("pruning.keep_ratio")] = None,
    strategies: StrategiesOpt = None,
    output_dir: OutputDirOpt = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads while measuring (overrides bench.threads; fewer than the cores on a busy machine).",
    )] = None,
    wide: WideOpt = False,
) -> None:
    """Measure TTFT, decode time, peak memory and KV cache per (strategy, keep ratio, batch size); writes <output_dir>/<name>/bench.jsonl."""
    cfg = load_cli_config(
        config,
        **{"output_dir": str(output_dir) if output_dir else None,
           "bench.batch_sizes": parse_list(batch_sizes, int, "--batch-sizes"), "bench.threads": threads},
    )
    ratio_list = parse_list(ratios, float, "--ratios")
    strategy_list = parse_list(strategies, name="--strategies")
    check_strategies(strategy_list)
    from vtprune.bench.cost import check_ratios

    check_ratios(ratio_list or [])  # before the model loads, not in the run
    quiet_libraries()
    import vtprune
    from vtprune.bench import run_bench
    from vtprune.report.tables import ideal_cell

    pipeline = vtprune.load(cfg)
    out = Path(cfg.output_dir) / cfg.name
    rows = run_bench(pipeline, ratios=ratio_list, strategies=strategy_list, output_dir=out)
    # The ×ideal cells carry the measured speed-up and say "noisy" themselves: the essentials without --wide.
    _print_table(rows, [
        ("strategy", "strategy", str, ESSENTIAL), ("keep", "keep_ratio", "{:g}", ESSENTIAL),
        ("batch", "batch_size", str, ESSENTIAL), ("kept", "kept_fraction_mean", "{:.3f}", ESSENTIAL),
        ("TTFT ms", "ttft_ms", "{:.1f}", ESSENTIAL), ("decode ms/tok", "decode_ms_per_token", "{:.2f}", ESSENTIAL),
        ("e2e ms", "e2e_ms", "{:.1f}", WIDE), ("tok/s", "tokens_per_s", "{:.1f}", WIDE),
        ("TTFT ×", "ttft_ms_ratio", "{:.2f}", WIDE), ("decode ×", "decode_ms_per_token_ratio", "{:.2f}", WIDE),
        ("noisy", "noisy", lambda v: "noisy" if v else "", WIDE),
        ("TTFT ×ideal", None, lambda r: ideal_cell(SimpleNamespace(**r), "ttft_ms", "ideal_ttft_speedup"), ESSENTIAL),
        ("decode ×ideal", None,
         lambda r: ideal_cell(SimpleNamespace(**r), "decode_ms_per_token", "ideal_decode_speedup"), ESSENTIAL),
        ("peak MiB", "peak_memory_bytes", _mib, ESSENTIAL), ("KV self MiB", "kv_self_bytes", _mib, WIDE),
        ("KV cross MiB", "kv_cross_bytes", _mib, WIDE), ("select ms", "select_ms", "{:.2f}", WIDE),
    ], title=f"{cfg.name} — {rows[0]['device']}, {rows[0]['dtype']}" + (" (smoke: tiny model)" if rows[0]["smoke"] else "") + (" (micro-model figures)" if rows[0].get("micro") else ""),
        wide=wide)
    typer.echo(f"wrote {out / 'bench.jsonl'}", err=True)


@app.command()
@handle_errors
def cost(
    config: ConfigOpt,
    batch_sizes: BatchSizesOpt = None,
    ratios: Annotated[str | None, _ratios_opt("1.0,0.75,0.5,0.25")] = None,
    strategies: StrategiesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
    wide: WideOpt = False,
) -> None:
    """Analytic KV-cache bytes (self / cross attention), prefill FLOPs (vision + LLM) and ideal speed-ups per keep
    ratio, from the model's config alone."""
    import json

    cfg = load_cli_config(config, **{"bench.batch_sizes": parse_list(batch_sizes, int, "--batch-sizes")})
    strategy_list = parse_list(strategies, name="--strategies")
    check_strategies(strategy_list)
    quiet_libraries()
    from vtprune.bench import cost_for_config

    rows = cost_for_config(cfg, ratios=parse_list(ratios, float, "--ratios"), strategies=strategy_list)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows, [
        ("strategy", "strategy", str, ESSENTIAL), ("keep", "keep_ratio", "{:g}", ESSENTIAL),
        ("batch", "batch_size", str, ESSENTIAL), ("visual", "num_visual", str, WIDE),
        ("kept", "num_kept", str, ESSENTIAL), ("KV self MiB", "kv_self_bytes", _mib, ESSENTIAL),
        ("KV cross MiB", "kv_cross_bytes", _mib, ESSENTIAL), ("KV total MiB", "kv_bytes", _mib, WIDE),
        ("prefill TFLOPs", "prefill_flops", _tflops, WIDE), ("vision TFLOPs", "vision_flops", _tflops, ESSENTIAL),
        ("total TFLOPs", "total_prefill_flops", _tflops, ESSENTIAL),
        ("TTFT ideal ×", "ideal_ttft_speedup", "{:.2f}", ESSENTIAL),
        ("decode MiB/step", "decode_bytes_per_step", _mib, WIDE),
        ("decode ideal ×", "ideal_decode_speedup", "{:.2f}", ESSENTIAL),
    ], title=f"{cfg.name} — {rows[0]['family']}, {rows[0]['dtype']}, {_visual(rows)} visual and "
             f"{cfg.bench.prompt_tokens} text tokens, cache after prefill", wide=wide)


def _visual(rows) -> str:
    """The visual-token count of the rows, a range where the strategies' inputs differ."""
    counts = sorted({r["num_visual"] for r in rows})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _mib(value) -> str:
    return f"{value / 2**20:.2f}"


def _tflops(value) -> str:
    return f"{value / 1e12:.3f}"


ESSENTIAL, WIDE = True, False  # a column shown by default, or with --wide only


def _cell(row: dict, key, fmt) -> str:
    value = row if key is None else row.get(key)  # no key: the cell is made from the whole row
    return "—" if value is None else fmt.format(value) if isinstance(fmt, str) else fmt(value)


def _longest(rows, columns, header) -> int:
    _, key, fmt, _ = next(c for c in columns if c[0] == header)
    return max((len(_cell(row, key, fmt)) for row in rows), default=0)


def _print_table(rows: list[dict], columns, title: str, wide: bool = False) -> None:
    """The rows as a table: the essential columns within 120 columns (less on a narrower terminal), long cells
    wrapped, never cut; every column with ``wide``, at its natural width."""
    import sys

    from rich.console import Console
    from rich.table import Table

    # A column of zeros says nothing (KV cross on a self-attention model): gone unless --wide.
    shown = [c for c in columns if wide or (c[3] and any(row.get(c[1], 1) not in (0, None) for row in rows))]
    table = Table(title=title)
    for header, *_ in shown:
        # A strategy name, "1.60× / 2.05× (78 %)" or a KV column, the headline of a cost table, must not break
        # over lines: the other figures' headers wrap instead.
        keep_whole = header == "strategy" or "×ideal" in header or header.startswith("KV")
        table.add_column(header, justify="left" if header == "strategy" else "right", overflow="fold",
                         no_wrap=keep_whole,
                         min_width=max(_longest(rows, shown, header), len(header) if header.startswith("KV") else 0)
                         if keep_whole else None)
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for _, key, fmt, _ in shown))
    if wide:
        width = 10_000  # the table's own width: a wide table is for a log or a wide window, not to be folded
    else:
        width = min(Console().width, TABLE_WIDTH) if sys.stdout.isatty() else TABLE_WIDTH
    Console(width=width).print(table)
