"""``vtprune serve-bench``: pruned and unpruned requests under concurrent load on one vLLM engine, as paired ratios.

Closed loop, as vLLM's own serving benchmark with ``--max-concurrency``: at concurrency C, C clients each send their
next request as soon as their last one has finished, until the visit's requests are done. Every (plan,
concurrency) is visited once per round, the plans in a shuffled order each round, on the one engine (the plan
travels with each request). Each figure is the median over rounds; each pruned figure is also a paired ratio to the
unpruned visit of the same round and concurrency, with a bootstrap interval (``vtprune.bench.timing``), so that a
drift of the machine cannot pose as a speed-up.

Every request is made unique to vLLM's caches (its own ``multi_modal_uuids``, prefix caching off), so that no plan
is served from another's encoder or prefix cache; outputs are a fixed number of tokens (``ignore_eos``), so that the
plans decode alike. Two ideal speed-ups stand beside each measured one. From the token counts: time to first token
bound by the prompt's tokens, throughput by the tokens each request puts through the model (prompt + output). From
the compute (``vtprune.bench.cost.request_flops``): the same with the vision tower counted, which runs on every
image whatever is pruned after it, and each output token costed as one token through the weights.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from pathlib import Path

from vtprune.bench.timing import paired_ratio, too_wide

CONCURRENCY = (1, 4, 16, 64)
#: engine arguments of a benchmark: cache blocks small enough that pruning shows in them, no prefix cache
BENCH_ENGINE = {"block_size": 32, "enable_prefix_caching": False, "disable_log_stats": False, "max_num_seqs": 64}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the nearest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def run_visit(engine, requests: list[dict], concurrency: int, params, tag: str, kv_peak: list) -> dict:
    """One closed-loop visit: ``concurrency`` clients over ``requests``; per-request client-side times."""
    pending = iter(enumerate(requests))
    done = []
    kv_peak.clear()

    async def client():
        for i, request in pending:  # one iterator shared by the clients: each takes the next request
            start = time.perf_counter()
            first = last = None
            async for out in engine.generate(request, params, request_id=f"{tag}-{i}"):
                now = time.perf_counter()
                if first is None and out.outputs[0].token_ids:
                    first = now
                last = now
            tokens = len(out.outputs[0].token_ids)
            done.append({"ttft": first - start, "e2e": last - start, "prompt": len(out.prompt_token_ids),
                         "output": tokens, "itl": (last - first) / (tokens - 1) if tokens > 1 else None})

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    itls = [d["itl"] for d in done if d["itl"] is not None]
    return {
        "req_per_s": len(done) / wall,
        "out_tok_per_s": sum(d["output"] for d in done) / wall,
        "ttft_p50_ms": 1000 * percentile([d["ttft"] for d in done], 50),
        "ttft_p99_ms": 1000 * percentile([d["ttft"] for d in done], 99),
        "itl_ms": 1000 * statistics.median(itls) if itls else None,
        "e2e_p50_ms": 1000 * percentile([d["e2e"] for d in done], 50),
        "prompt_tokens": statistics.mean(d["prompt"] for d in done),
        "output_tokens": statistics.mean(d["output"] for d in done),
        "kv_peak_usage": max(kv_peak, default=None),
    }


def serve_bench(base, plans: list[tuple[str, float]], samples: list, *, concurrency=CONCURRENCY, rounds: int = 3,
                warmup: int = 1, requests_per_client: int = 2, min_requests: int = 8, new_tokens: int = 16,
                seed: int = 0, progress=None) -> list[dict]:
    """One row per (plan, concurrency), the unpruned plan ``("none", 1.0)`` included and first.

    ``base`` is a ``VllmPipeline`` made with ``start_engine=False``: the benchmark runs its own ``AsyncLLM`` on
    ``base``'s model and engine arguments; ``samples``: ``(image, question)`` pairs, cycled."""
    return asyncio.run(_serve_bench(base, plans, samples, concurrency, rounds, warmup, requests_per_client,
                                    min_requests, new_tokens, seed, progress or (lambda line: None)))


async def _serve_bench(base, plans, samples, concurrency, rounds, warmup, per_client, min_requests, new_tokens, seed,
                       progress):
    from transformers import AutoConfig
    from vllm import SamplingParams

    text_tokens = len(base.request(*samples[0])["prompt_token_ids"]) - 1  # the prompt less its image token
    num_visual = base.num_visual(samples[0][0])
    hf_config = AutoConfig.from_pretrained(base.engine_args["model"])
    engine, blocks, block_size = start_async_engine(
        base, kv_cache_bytes(base, hf_config, max(concurrency), text_tokens + num_visual + new_tokens))
    kv_peak: list = []
    KV_SINKS.append(kv_peak)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, seed=seed)
    plans = [("none", 1.0)] + [p for p in plans if p != ("none", 1.0)]
    pipes = {p: base.with_pruning(*p) for p in plans}
    per_visit = {c: max(min_requests, per_client * c) for c in concurrency}
    visits: dict = {}  # (plan, concurrency) -> figures per round
    counter = 0

    def requests_for(pipe, count: int) -> list[dict]:
        nonlocal counter
        out = []
        for i in range(count):
            image, question = samples[i % len(samples)]
            request = pipe.request(image, question)
            counter += 1
            request["multi_modal_uuids"] = {"image": [f"vtprune-bench-{counter}"]}  # no cache serves another's
            out.append(request)
        return out

    rng = random.Random(seed)
    for round_index in range(-warmup, rounds):
        for c in concurrency:
            order = list(plans)
            rng.shuffle(order)
            for plan in order:
                figures = await run_visit(engine, requests_for(pipes[plan], per_visit[c]), c, params,
                                          f"r{round_index}-c{c}-{plan[0]}-{plan[1]}", kv_peak)
                if round_index >= 0:
                    visits.setdefault((plan, c), []).append(figures)
                progress(f"round {round_index + 1 if round_index >= 0 else 'warm-up'} c={c} {plan[0]}@{plan[1]}: "
                         f"{figures['req_per_s']:.1f} req/s, TTFT p50 {figures['ttft_p50_ms']:.1f} ms")
    engine.shutdown()
    KV_SINKS.remove(kv_peak)
    counts = {"num_visual": num_visual, "requests_per_visit": per_visit, "text_tokens": text_tokens,
              "hf_config": hf_config}
    return [_row(plan, c, visits, blocks, block_size, seed, counts) for plan in plans for c in concurrency]


#: lists the stat logger appends the engine's KV-cache usage to, each step (one per running benchmark)
KV_SINKS: list[list] = []


def kv_cache_bytes(base, hf_config, clients: int, tokens: int) -> int:
    """KV-cache bytes for ``clients`` unpruned requests of ``tokens`` each, twice over (at least the engine's own
    setting): a cache that made the unpruned plan wait or be preempted at the top concurrency would count as a
    speed-up of pruning that is only a too-small cache."""
    from vtprune.bench.cost import DTYPE_BYTES
    from vtprune.bench.kv import kv_bytes_per_token

    layers = hf_config.get_text_config(decoder=True).num_hidden_layers
    block = BENCH_ENGINE["block_size"]
    need = 2 * clients * -(-tokens // block) * block * layers * kv_bytes_per_token(
        hf_config, DTYPE_BYTES[base.engine_args["dtype"]])
    return max(base.engine_args.get("kv_cache_memory_bytes", 0), need)


def start_async_engine(base, kv_bytes: int | None = None):
    """An ``AsyncLLM`` over ``base``'s model and engine settings (``VllmPipeline.start(..., start_engine=False)``),
    with a stat logger that records the KV-cache usage of every step; ``kv_bytes``: its KV cache's size."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KVUsage(StatLoggerBase):
        def __init__(self, vllm_config, engine_index=0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                for sink in KV_SINKS:
                    sink.append(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    args = base.engine_args | BENCH_ENGINE | ({"kv_cache_memory_bytes": kv_bytes} if kv_bytes else {})
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[KVUsage])
    cache = engine.vllm_config.cache_config
    return engine, cache.num_gpu_blocks, cache.block_size


def _row(plan, c, visits, blocks, block_size, seed, counts) -> dict:
    from vtprune.bench.cost import request_flops
    from vtprune.strategies import budget

    strategy, ratio = plan
    mine, none = visits[(plan, c)], visits[(("none", 1.0), c)]
    med = {k: statistics.median(v[k] for v in mine) for k in mine[0] if all(v[k] is not None for v in mine)}
    prompt_none, output = statistics.median(v["prompt_tokens"] for v in none), med["output_tokens"]
    row = {
        "strategy": strategy, "keep_ratio": ratio, "concurrency": c, "rounds": len(mine),
        "requests": counts["requests_per_visit"][c], "num_visual": counts["num_visual"],
        "num_kept": counts["num_visual"] if strategy == "none" else budget(counts["num_visual"], ratio), **med,
        "prompt_tokens_none": prompt_none,
        "kv_blocks_per_request": math.ceil((med["prompt_tokens"] + output) / block_size),
        "kv_blocks_per_request_none": math.ceil((prompt_none + output) / block_size),
        "kv_peak_blocks": round(med["kv_peak_usage"] * blocks) if "kv_peak_usage" in med else None,
        "block_size": block_size,
        "ideal_ttft_speedup": prompt_none / med["prompt_tokens"],
        "ideal_throughput_speedup": (prompt_none + output) / (med["prompt_tokens"] + output),
    }
    flops = {kept: request_flops(counts["hf_config"], text_tokens=counts["text_tokens"], num_visual=counts["num_visual"],
                                 num_kept=kept, output_tokens=round(output))
             for kept in (counts["num_visual"], row["num_kept"])}
    row["ideal_compute_ttft_speedup"] = flops[counts["num_visual"]]["prefill"] / flops[row["num_kept"]]["prefill"]
    row["ideal_compute_throughput_speedup"] = flops[counts["num_visual"]]["total"] / flops[row["num_kept"]]["total"]
    if plan == ("none", 1.0):
        return row
    # Throughput: higher is better, so its ratio is pruned / none; latencies: none / pruned. Both read as speed-ups.
    for column, better in (("req_per_s", "higher"), ("out_tok_per_s", "higher"), ("ttft_p50_ms", "lower"),
                           ("ttft_p99_ms", "lower"), ("itl_ms", "lower")):
        if any(v[column] is None for v in mine + none):
            continue
        values, reference = [v[column] for v in mine], [v[column] for v in none]
        if better == "lower":
            values, reference = reference, values
        ratio_, lo, hi = paired_ratio(values, reference, seed=f"{seed}-{c}-{column}")
        row[f"{column}_speedup"], row[f"{column}_speedup_lo"], row[f"{column}_speedup_hi"] = ratio_, lo, hi
        row[f"{column}_noisy"] = len(mine) < 3 or too_wide(ratio_, lo, hi)
    for column, ideal, name in (("req_per_s", "ideal_throughput_speedup", "req_per_s_efficiency"),
                                ("ttft_p50_ms", "ideal_ttft_speedup", "ttft_p50_ms_efficiency"),
                                ("req_per_s", "ideal_compute_throughput_speedup", "req_per_s_compute_efficiency"),
                                ("ttft_p50_ms", "ideal_compute_ttft_speedup", "ttft_p50_ms_compute_efficiency")):
        if f"{column}_speedup" in row:
            row[name] = row[f"{column}_speedup"] / row[ideal]
    return row


def write_serve_results(rows: list[dict], config, out_dir: Path, started: str, device: str, dtype: str) -> Path:
    """``serve.jsonl`` (one row per plan × concurrency) and ``run.json`` last, as every vtprune run."""
    import platform

    from vtprune.results import RUN_FILE, is_micro, is_smoke, now, versions, write_json, write_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"model": config.model.path, "engine": "vllm", "device": device, "dtype": dtype}
    write_jsonl(out_dir / "serve.jsonl", [{**common, **row} for row in rows])
    write_json(out_dir / RUN_FILE, {"name": config.name, "kind": "serve-bench", "engine": "vllm",
                                    "config": config.to_dict(), "versions": versions(), "device": device,
                                    "dtype": dtype, "smoke": is_smoke(config), "micro": is_micro(config),
                                    "platform": platform.platform(), "started": started, "finished": now()})
    return out_dir
