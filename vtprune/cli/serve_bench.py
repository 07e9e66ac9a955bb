"""``vtprune serve-bench``: throughput and latency under concurrent load on vLLM, pruned vs unpruned, paired."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtprune.cli import app
from vtprune.cli.common import ConfigOpt, OutputDirOpt, check_strategies, handle_errors, load_cli_config, parse_list
from vtprune.errors import VtpruneError


@app.command("serve-bench")
@handle_errors
def serve_bench(
    config: ConfigOpt,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts (closed loop).")] = "1,4,16,64",
    ratios: Annotated[str | None, typer.Option(help="Keep ratios (default: the config's).")] = None,
    strategies: Annotated[str | None, typer.Option(help="Strategies (default: the config's).")] = None,
    rounds: Annotated[int, typer.Option(help="Measured rounds; each visits every plan at every concurrency.")] = 3,
    warmup: Annotated[int, typer.Option(help="Rounds run first and not counted.")] = 1,
    requests_per_client: Annotated[int, typer.Option(help="Requests per client in one visit.")] = 2,
    min_requests: Annotated[int, typer.Option(help="Requests in one visit at least (few clients: a longer visit).")] = 8,
    new_tokens: Annotated[int, typer.Option(help="Tokens each request generates (end-of-sequence ignored).")] = 16,
    output_dir: OutputDirOpt = None,
) -> None:
    """Serve the config's model on vLLM (its own environment: scripts/install-vllm.sh) and measure requests/s,
    tokens/s, TTFT p50/p99 and per-token latency at each concurrency, each pruned plan as a paired ratio to the
    unpruned one of the same round; writes <output_dir>/<name>/serve.jsonl."""
    cfg = load_cli_config(config, output_dir=str(output_dir) if output_dir else None)
    from vtprune.bench.cost import check_ratios

    levels = parse_list(concurrency, int, "--concurrency")
    if not levels or any(c < 1 for c in levels):
        raise VtpruneError(f"--concurrency: '{concurrency}' must list positive integers, e.g. 1,4,16,64")
    for option, value, low in (("--rounds", rounds, 1), ("--warmup", warmup, 0),
                               ("--requests-per-client", requests_per_client, 1), ("--min-requests", min_requests, 1),
                               ("--new-tokens", new_tokens, 1)):
        if value < low:
            raise VtpruneError(f"{option}: {value} is not allowed (allowed: an integer >= {low})")
    names = parse_list(strategies, name="--strategies") or [cfg.pruning.strategy]
    check_strategies(names)
    ratio_list = check_ratios(parse_list(ratios, float, "--ratios") or [cfg.pruning.keep_ratio])
    plans = [(s, r) for s in names for r in ratio_list if s != "none" and r < 1]
    from vtprune.results import now
    from vtprune.vllm.engine import VllmPipeline

    # Every plan is checked against the family before the engine starts: one line, nothing written.
    base = VllmPipeline.start(cfg, start_engine=False)
    for strategy, ratio in plans:
        base.with_pruning(strategy, ratio)
    from vtprune.eval import synth
    from vtprune.results import device_name
    from vtprune.vllm.serve_bench import serve_bench as run

    samples = [(s.image, s.question) for s in synth.draw_split(synth.MINI_SEED, 32, synth.KINDS)]
    started = now()
    rows = run(base, plans, samples, concurrency=levels, rounds=rounds, warmup=warmup,
               requests_per_client=requests_per_client, min_requests=min_requests, new_tokens=new_tokens, seed=cfg.seed,
               progress=lambda line: typer.echo(line, err=True))
    import torch

    from vtprune.vllm.serve_bench import write_serve_results

    out = write_serve_results(rows, cfg, Path(cfg.output_dir) / cfg.name, started, device_name(torch.device("cpu")),
                              base.engine_args["dtype"])
    typer.echo(serve_table(rows))
    typer.echo(f"wrote {out / 'serve.jsonl'}", err=True)


def serve_table(rows: list[dict]) -> str:
    """The figures a serving user reads first, one line per plan × concurrency (speed-ups: pruned over unpruned)."""
    header = "| strategy | keep | conc. | prompt tokens | req/s | TTFT p50 ms | TTFT p99 ms | ITL ms | KV blocks/req |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        def cell(column, digits=1):
            value = f"{r[column]:.{digits}f}"
            if f"{column}_speedup" in r:
                flag = " noisy" if r[f"{column}_noisy"] else ""
                value += f" ({r[f'{column}_speedup']:.2f}×{flag})"
            return value

        lines.append(f"| {r['strategy']} | {r['keep_ratio']:g} | {r['concurrency']} | {r['prompt_tokens']:.0f} | "
                     f"{cell('req_per_s')} | {cell('ttft_p50_ms')} | {cell('ttft_p99_ms')} | "
                     f"{cell('itl_ms') if r.get('itl_ms') is not None else '-'} | {r['kv_blocks_per_request']} |")
    return "\n".join(lines)
