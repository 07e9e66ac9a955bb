"""Where a pruned prefill's time goes: each point's time-to-first-token call under torch.profiler, the matrix
multiplies apart from everything else, beside the unpruned point.

The ideal TTFT speed-up of ``vtprune cost`` / ``bench`` is a FLOP bound: it assumes every FLOP costs the same. A CPU
BLAS runs a product with fewer rows (fewer tokens) at a lower throughput, so part of a gap between a measured and an
ideal speed-up can lie in the matrix multiplies themselves rather than in work the model code adds. Per point and
round this prints the wall time, the matrix multiplies' time and share of the profiled time, their FLOPs (the
profiler's count) and throughput, and the speed-ups over ``none`` in the same round: wall, matrix-multiply time,
matrix-multiply FLOPs. Rounds visit the points in turn after one warm-up call each, so drift hits them alike.

    python scripts/profile_prefill.py --config configs/architectures/qwen2.5-vl-7b-proxy.yaml \\
        --strategies downsample --ratio 0.25 --rounds 2

Matrix multiplies are the ATen ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` kernels (the linear layers); attention runs
in its own kernel (``scaled_dot_product_attention``) and counts as the rest, as does the patch-embedding convolution.
"""

from __future__ import annotations

import argparse
import sys
import time

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_point(pipe, inputs) -> dict:
    """Wall seconds, matrix-multiply seconds / FLOPs and the profiled total of one TTFT call."""
    from torch.profiler import ProfilerActivity, profile

    from vtprune.bench.runner import generate

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        generate(pipe, inputs, 1)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    matmuls = [e for e in events if e.key in MATMULS]
    return {"wall": wall, "profiled": sum(e.self_cpu_time_total for e in events) / 1e6,
            "mm": sum(e.self_cpu_time_total for e in matmuls) / 1e6, "mm_flops": sum(e.flops for e in matmuls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (its model; its strategy unless --strategies)")
    parser.add_argument("--strategies", help="comma-separated strategies beside none (default: pruning.strategy)")
    parser.add_argument("--ratio", type=float, help="keep ratio (default: pruning.keep_ratio)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads for the whole process (default: torch's own)")
    args = parser.parse_args(argv)

    import torch

    import vtprune
    from vtprune.errors import ConfigError

    if args.batch_size < 1 or args.rounds < 1 or (args.threads is not None and args.threads < 1):
        print("error: --batch-size, --rounds and --threads must be positive integers", file=sys.stderr)
        return 2
    try:
        pipeline = vtprune.load(args.config)
        names = args.strategies.split(",") if args.strategies else [pipeline.config.pruning.strategy]
        pipes = [pipeline.with_pruning("none", 1.0)] + [
            pipeline.with_pruning(name.strip(), args.ratio) for name in names if name.strip() != "none"]
        for pipe in pipes:
            pipe.plan  # validates the strategy and ratio before anything runs
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = pipeline.config
    inputs = pipeline.adapter.synthetic_inputs(args.batch_size, cfg.bench.prompt_tokens, torch.Generator().manual_seed(cfg.seed))
    print(f"{cfg.name}: batch {args.batch_size}, {cfg.bench.prompt_tokens} text tokens, {torch.get_num_threads()} threads, "
          f"{pipeline.adapter.model.dtype}, {pipeline.adapter.device}")
    print("| round | strategy | keep | wall s | matmul s | matmul share | matmul GFLOP | matmul GFLOP/s "
          "| speed-up: wall | matmul time | matmul FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        from vtprune.bench.runner import generate

        for pipe in pipes:
            generate(pipe, inputs, 1)
        for round_ in range(1, args.rounds + 1):
            figures = [profile_point(pipe, inputs) for pipe in pipes]
            none = figures[0]
            for pipe, f in zip(pipes, figures):
                rate = f["mm_flops"] / f["mm"] / 1e9 if f["mm"] else float("nan")
                flops = none["mm_flops"] / f["mm_flops"] if f["mm_flops"] else float("nan")
                print(f"| {round_} | {pipe.plan.strategy.name} | {pipe.plan.keep_ratio:g} | {f['wall']:.3f} | {f['mm']:.3f} "
                      f"| {f['mm'] / f['profiled']:.0%} | {f['mm_flops'] / 1e9:.4g} | {rate:.1f} "
                      f"| {none['wall'] / f['wall']:.2f}× | {none['mm'] / f['mm']:.2f}× | {flops:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
