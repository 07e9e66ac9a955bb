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
    _print_table(rows, [
        ("strategy", "strategy", str), ("keep", "keep_ratio", "{:g}"), ("batch", "batch_size", str),
        ("kept", "kept_fraction_mean", "{:.3f}"), ("TTFT ms", "ttft_ms", "{:.1f}"),
        ("decode ms/tok", "decode_ms_per_token", "{:.2f}"), ("e2e ms", "e2e_ms", "{:.1f}"), ("tok/s", "tokens_per_s", "{:.1f}"),
        ("TTFT ×", "ttft_ms_ratio", "{:.2f}"), ("decode ×", "decode_ms_per_token_ratio", "{:.2f}"),
        ("noisy", "noisy", lambda v: "noisy" if v else ""),
        ("TTFT ×ideal", None, lambda r: ideal_cell(SimpleNamespace(**r), "ttft_ms", "ideal_ttft_speedup")),
        ("decode ×ideal", None,
         lambda r: ideal_cell(SimpleNamespace(**r), "decode_ms_per_token", "ideal_decode_speedup")),
        ("peak MiB", "peak_memory_bytes", _mib), ("KV self MiB", "kv_self_bytes", _mib), ("KV cross MiB", "kv_cross_bytes", _mib),
        ("select ms", "select_ms", "{:.2f}"),
    ], title=f"{cfg.name} — {rows[0]['device']}, {rows[0]['dtype']}" + (" (smoke: tiny model)" if rows[0]["smoke"] else "") + (" (micro-model figures)" if rows[0].get("micro") else ""))
    typer.echo(f"wrote {out / 'bench.jsonl'}", err=True)


@app.command()
@handle_errors
def cost(
    config: ConfigOpt,
    batch_sizes: BatchSizesOpt = None,
    ratios: Annotated[str | None, _ratios_opt("1.0,0.75,0.5,0.25")] = None,
    strategies: StrategiesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
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
        ("strategy", "strategy", str), ("keep", "keep_ratio", "{:g}"), ("batch", "batch_size", str),
        ("visual", "num_visual", str), ("kept", "num_kept", str), ("KV self MiB", "kv_self_bytes", _mib),
        ("KV cross MiB", "kv_cross_bytes", _mib), ("KV total MiB", "kv_bytes", _mib), ("prefill TFLOPs", "prefill_flops", _tflops),
        ("vision TFLOPs", "vision_flops", _tflops), ("total TFLOPs", "total_prefill_flops", _tflops),
        ("TTFT ideal ×", "ideal_ttft_speedup", "{:.2f}"), ("decode MiB/step", "decode_bytes_per_step", _mib),
        ("decode ideal ×", "ideal_decode_speedup", "{:.2f}"),
    ], title=f"{cfg.name} — {rows[0]['family']}, {rows[0]['dtype']}, {cfg.bench.prompt_tokens} text tokens, cache after prefill")


def _mib(value) -> str:
    return f"{value / 2**20:.2f}"


def _tflops(value) -> str:
    return f"{value / 1e12:.3f}"


def _print_table(rows: list[dict], columns, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header, _, _ in columns:
        # "1.60× / 2.05× (78 %)" must not break over lines: narrower columns wrap their headers instead
        table.add_column(header, justify="left" if header == "strategy" else "right", no_wrap="×ideal" in header)
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row if key is None else row.get(key)  # no key: the cell is made from the whole row
            cells.append("—" if value is None else fmt.format(value) if isinstance(fmt, str) else fmt(value))
        table.add_row(*cells)
    Console(width=200).print(table)
