"""``run_bench``: latency, memory and KV cache per (strategy, keep_ratio, batch_size) on synthetic inputs.

Per batch size every point is warmed up (``bench.warmup`` untimed visits each), then measured in ``bench.repeats``
rounds: each round visits every point once, in an order shuffled per round, so that machine drift hits all points
alike. ``none`` @ 1.0 is in every bench: each point's figures are also reported as paired ratios to the ``none``
visit of the same round. A visit makes two ``generate`` calls on the same synthetic batch: ``max_new_tokens=1``
(time to first token: vision tower, scoring and selection, prefill) and exactly ``new_tokens`` tokens (end to end),
during which every decode step is timed on its own. Figures are medians over the rounds, spreads their IQR.
Beside each measured speed-up stands the ideal one for the point's own shape (``cost.ideal_figures``: FLOPs for
the time to first token, bytes read for a decode step) and their ratio, the efficiency.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from vtprune.bench.cost import check_ratios, ideal_figures, resized_ratio, tower_merge
from vtprune.bench.kv import analytic_kv_bytes, cross_layer_indices, measured_kv_bytes
from vtprune.bench.memory import memory_kind, peak_bytes, reset_peak
from vtprune.bench.timing import median_spread, paired_ratio, step_clock, timed, too_wide
from vtprune.models.mllama import tile_tokens


def bench_pipelines(pipeline, strategies=None, ratios=None) -> list:
    """A pipeline per (strategy, keep_ratio); ``none`` runs at 1.0 only. Raises ConfigError before anything runs."""
    cfg = pipeline.config.pruning
    ratios = check_ratios(ratios or [cfg.keep_ratio])
    out = []
    for name in strategies or [cfg.strategy]:
        for ratio in [1.0] if name == "none" else ratios:
            out.append(pipeline.with_pruning(name, ratio))
    return out


def run_bench(pipeline, batch_sizes=None, output_dir=None, ratios=None, strategies=None, progress: bool = True) -> list[dict]:
    """Bench rows (``vtprune.results`` schema) for every point; with ``output_dir``, write bench.jsonl then run.json.

    A ``none`` row is always among them (after the requested points when not asked for): it is every ratio's reference."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtprune.results import RUN_FILE, is_complete, now, run_metadata, write_json, write_jsonl

    started = now()
    batch_sizes = batch_sizes or pipeline.config.bench.batch_sizes
    if not all(isinstance(b, int) and b >= 1 for b in batch_sizes):
        from vtprune.errors import ConfigError

        raise ConfigError(f"--batch-sizes: {batch_sizes} must be positive integers")
    pipes = bench_pipelines(pipeline, strategies, ratios)
    if not any(_is_none(pipe) for pipe in pipes):
        pipes.append(pipeline.with_pruning("none", 1.0, {}))
    reference = next(i for i, pipe in enumerate(pipes) if _is_none(pipe))
    settings = pipeline.config.bench
    rows = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("bench", total=len(batch_sizes) * len(pipes) * (settings.warmup + settings.repeats))

        def tick(pipe, batch, what):
            description = f"{pipe.plan.strategy.name} @ {pipe.plan.keep_ratio:g}, batch {batch}, {what}"
            bar.update(task, advance=1, description=description)
            if progress and not bar.console.is_terminal:
                # A bar is only drawn on a terminal: a bench in a log (nohup, CI) would be silent for an hour.
                t = bar.tasks[task]
                bar.console.print(f"bench {t.completed:g}/{t.total:g} {description} ({t.elapsed:.0f} s)", highlight=False)

        with torch_threads(settings.threads):
            for batch in batch_sizes:
                inputs, visits = measure_rounds(pipes, batch, tick)
                for i, pipe in enumerate(pipes):
                    rows[i, batch] = bench_point(pipe, batch, inputs, visits[i], visits[reference])
    rows = [rows[i, batch] for i in range(len(pipes)) for batch in batch_sizes]
    if output_dir is not None:
        out = Path(output_dir)
        write_jsonl(out / "bench.jsonl", rows)
        adapter = pipeline.adapter
        meta = run_metadata(pipeline.config, "bench", adapter.device, adapter.model.dtype, started)
        meta.update(weights=pipeline.config.model.weights, peak_memory=memory_kind(adapter.device), finished=now())
        if is_complete(out):
            # A sweep point benchmarked after its eval: keep the eval's metadata (tasks, limit, judge) beside ours.
            previous = json.loads((out / RUN_FILE).read_text())
            if previous.get("kind") == "eval":
                meta = {**previous, **meta, "kind": "eval+bench", "started": previous["started"]}
        write_json(out / RUN_FILE, meta)  # last: marks the folder complete
    return rows


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's CPU thread count set to ``threads`` for the measurement (None: left as it is), then restored.

    Beside other jobs, torch's default (one thread per core) oversubscribes the cores (a busy 2-core run was 12 times
    slower, not two; docs: Benchmarking, CPU proxies); fewer threads than cores leave room for the other jobs. Every row records
    the count it ran with."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _is_none(pipe) -> bool:
    return pipe.plan.strategy.name == "none"


@dataclass
class Visit:
    """One timed visit of a point: seconds, and what the end-to-end call left behind."""

    ttft: float
    e2e: float
    decode: float | None  # median decode step of this visit; None with a single new token
    select: float
    peak: int
    kv: dict  # measured cache bytes; the cache itself is dropped, lest it hold memory through later visits
    records: list


def measure_rounds(pipes, batch_size: int, tick=None):
    """``(inputs, visits)``: every pipe warmed up, then visited once per round in a shuffled order;
    ``visits[i]`` lists pipe i's visits in round order, so that index r of two pipes is the same round."""
    import torch

    cfg = pipes[0].config
    inputs = pipes[0].adapter.synthetic_inputs(batch_size, cfg.bench.prompt_tokens, torch.Generator().manual_seed(cfg.seed))
    visits = [[] for _ in pipes]
    with torch.inference_mode():
        for pipe in pipes:
            for _ in range(cfg.bench.warmup):
                generate(pipe, inputs, 1)
                generate(pipe, inputs, cfg.bench.new_tokens)
                if tick:
                    tick(pipe, batch_size, "warm-up")
        for round_ in range(cfg.bench.repeats):
            order = list(range(len(pipes)))
            random.Random(f"{cfg.seed}:{batch_size}:{round_}").shuffle(order)
            for i in order:
                visits[i].append(measure_visit(pipes[i], inputs))
                if tick:
                    tick(pipes[i], batch_size, f"round {round_ + 1}")
    return inputs, visits


def generate(pipe, inputs, tokens: int, **extra):
    """``(new_ids, records)`` of a greedy generate of exactly ``tokens`` tokens."""
    text_cfg = pipe.adapter.model.config.get_text_config(decoder=True)
    # Exactly n tokens every time (random weights may emit EOS early); no tokenizer is needed for padding.
    pad = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0
    return pipe.adapter.generate(inputs, pipe.plan, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=pad, **extra)


def measure_visit(pipe, inputs) -> Visit:
    """TTFT, end to end and the median decode step of one visit, with its peak memory and KV cache."""
    from transformers import DynamicCache, StoppingCriteriaList

    model, device, n = pipe.adapter.model, pipe.adapter.device, pipe.config.bench.new_tokens
    cache = DynamicCache(config=model.config)  # ours, so that its size can be read after generate
    clock = step_clock(device)
    reset_peak(device)
    ttft, _ = timed(lambda: generate(pipe, inputs, 1), device)
    e2e, (new_ids, records) = timed(
        lambda: generate(pipe, inputs, n, cache=cache, stopping_criteria=StoppingCriteriaList([clock])), device)
    peak = peak_bytes(device)
    steps = clock.intervals()
    if new_ids.shape[1] != n or len(steps) != n - 1:
        raise RuntimeError(f"generate returned {new_ids.shape[1]} new tokens in {len(steps) + 1} steps, expected {n}")
    decode = statistics.median(steps) if steps else None
    kv = measured_kv_bytes(cache, model.config)
    return Visit(ttft, e2e, decode, sum(r.select_seconds for r in records), peak, kv, records)


def bench_point(pipe, batch_size: int, inputs, visits: list[Visit], reference: list[Visit]) -> dict:
    """One bench row: ``pipe``'s visits on ``inputs`` (a synthetic batch of ``batch_size``), paired round by round
    with the ``reference`` (none) visits."""
    import torch

    from vtprune.api import kept_padding
    from vtprune.results import device_name, is_micro, is_smoke

    cfg, adapter, plan = pipe.config, pipe.adapter, pipe.plan
    settings, model = cfg.bench, adapter.model
    n = settings.new_tokens
    records, measured = visits[-1].records, visits[-1].kv  # the same in every visit
    kept = [r.num_kept for r in records]
    num_visual = max(r.num_visual for r in records)
    ids = inputs["input_ids"]
    if cross_layer_indices(model.config):
        # Mllama carries the image only in the cross layers, whose unpruned cache also holds empty (padding) tiles.
        image_tokens = 0
        cached_visual = math.prod(inputs["pixel_values"].shape[1:3]) * tile_tokens(model.config)
    else:
        image_tokens, cached_visual = int((ids[0] == model.config.image_token_id).sum()), num_visual
    shape = {"batch_size": batch_size, "text_tokens": ids.shape[1] - image_tokens, "num_visual": cached_visual,
             "num_kept": cached_visual if plan.is_noop else batch_kept(records),
             "placement": pipe.adapter.placement(plan), "element_size": model.dtype.itemsize}
    analytic = analytic_kv_bytes(model.config, **shape, decoded=n - 1)  # the last new token is never fed back
    ideal = ideal_figures(model.config, **shape, resized_to=resized_ratio(plan.strategy, plan.keep_ratio),
                          merged=tower_merge(plan.strategy, plan.keep_ratio))
    figures, ratios, intervals = {}, {}, {}
    for column, attr in (("ttft_ms", "ttft"), ("decode_ms_per_token", "decode"), ("e2e_ms", "e2e")):
        values = [getattr(v, attr) for v in visits]
        ci = (None, None, None)
        if values[0] is None:  # a single new token: no decode step
            figures |= {column: None, f"{column}_spread": None}
        else:
            median, spread = median_spread(values)
            figures |= {column: ms(median), f"{column}_spread": ms(spread)}
            ci = intervals[column] = paired_ratio(values, [getattr(v, attr) for v in reference], cfg.seed)
        ratios |= dict(zip((f"{column}_ratio", f"{column}_ratio_lo", f"{column}_ratio_hi"), ci))
    # One round has no interval to judge by; none is its own reference (every ratio exactly 1).
    noisy = not _is_none(pipe) and (len(visits) < 2 or any(
        too_wide(*intervals[c]) for c in ("ttft_ms", "decode_ms_per_token") if c in intervals))
    e2e_s = statistics.median(v.e2e for v in visits)
    return {
        "run": cfg.name, "model": cfg.model.path, "family": adapter.family, "strategy": plan.strategy.name,
        "keep_ratio": plan.keep_ratio, "batch_size": batch_size, "device": device_name(adapter.device),
        "dtype": str(model.dtype).replace("torch.", ""), "weights": cfg.model.weights, "smoke": is_smoke(cfg), "micro": is_micro(cfg),
        "prompt_tokens": settings.prompt_tokens, "new_tokens": n, "repeats": settings.repeats,
        "num_visual": num_visual,
        "num_kept_mean": statistics.fmean(kept),
        "kept_fraction_mean": statistics.fmean(r.kept_fraction for r in records),
        # 0 for a fixed budget on the bench's like-sized images
        "kept_padding": kept_padding(kept, [max(kept)] * len(kept)),
        **figures,
        "tokens_per_s": batch_size * n / e2e_s,
        "peak_memory_bytes": max(v.peak for v in visits),
        "kv_self_bytes": measured["self"], "kv_cross_bytes": measured["cross"],
        "kv_self_bytes_analytic": analytic["self"], "kv_cross_bytes_analytic": analytic["cross"],
        "select_ms": ms(statistics.median(v.select for v in visits)),
        "rounds": len(visits), "interleaved": True, "threads": torch.get_num_threads(),
        **ratios, "noisy": noisy,
        "ideal_ttft_speedup": ideal["ideal_ttft_speedup"], "ideal_decode_speedup": ideal["ideal_decode_speedup"],
        "ttft_efficiency": efficiency(ratios["ttft_ms_ratio"], ideal["ideal_ttft_speedup"]),
        "decode_efficiency": efficiency(ratios["decode_ms_per_token_ratio"], ideal["ideal_decode_speedup"]),
    }


def efficiency(ratio: float | None, ideal: float) -> float | None:
    """Measured speed-up (1 / the paired time ratio) over the ideal one: 1.0 = all the bound allows."""
    return None if ratio is None else 1 / ratio / ideal


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def batch_kept(records) -> int | list[int]:
    """The batch's longest kept set (shorter ones are padded to it); per stage for a multi-stage in-LLM plan."""
    if len(records[0].stage_kept) > 1:
        return [max(r.stage_kept[s] for r in records) for s in range(len(records[0].stage_kept))]
    return max(r.num_kept for r in records)
