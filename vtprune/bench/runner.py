"""``run_bench``: latency, memory and KV cache per (strategy, keep_ratio, batch_size) on synthetic inputs (DESIGN §6).

Per point, after ``bench.warmup`` untimed rounds, each of ``bench.repeats`` rounds makes two ``generate`` calls
on the same synthetic batch: one with ``max_new_tokens=1`` (time to first token: vision tower, scoring and
selection, prefill) and one with exactly ``new_tokens`` tokens (end to end). Decode time per token is
``(e2e - ttft) / (new_tokens - 1)`` per round. Figures are medians over the rounds, spreads their IQR.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from vtprune.bench.kv import analytic_kv_bytes, cross_layer_indices, layout_for, measured_kv_bytes, tile_tokens
from vtprune.bench.memory import memory_kind, peak_bytes, reset_peak
from vtprune.bench.timing import median_spread, timed


def bench_pipelines(pipeline, strategies=None, ratios=None) -> list:
    """A pipeline per (strategy, keep_ratio); ``none`` runs at 1.0 only. Raises ConfigError before anything runs."""
    from vtprune.bench.cost import check_ratios

    cfg = pipeline.config.pruning
    ratios = check_ratios(ratios or [cfg.keep_ratio])
    out = []
    for name in strategies or [cfg.strategy]:
        options = dict(cfg.options) if name == cfg.strategy else {}
        for ratio in [1.0] if name == "none" else ratios:
            out.append(pipeline.with_pruning(name, ratio, options))
    return out


def run_bench(pipeline, batch_sizes=None, output_dir=None, ratios=None, strategies=None, progress: bool = True) -> list[dict]:
    """Bench rows (``vtprune.results`` schema) for every point; with ``output_dir``, write bench.jsonl then run.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtprune.results import RUN_FILE, is_complete, now, run_metadata, write_json, write_jsonl

    started = now()
    batch_sizes = batch_sizes or pipeline.config.bench.batch_sizes
    if not all(isinstance(b, int) and b >= 1 for b in batch_sizes):
        from vtprune.errors import ConfigError

        raise ConfigError(f"--batch-sizes: {batch_sizes} must be positive integers")
    points = [(pipe, b) for pipe in bench_pipelines(pipeline, strategies, ratios) for b in batch_sizes]
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("bench", total=len(points))
        for pipe, batch in points:
            bar.update(task, description=f"{pipe.plan.strategy.name} @ {pipe.plan.keep_ratio:g}, batch {batch}")
            rows.append(bench_point(pipe, batch))
            bar.advance(task)
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


def bench_point(pipe, batch_size: int) -> dict:
    """One bench row: ``pipe``'s plan on a synthetic batch of ``batch_size``."""
    import torch
    from transformers import DynamicCache

    from vtprune.results import device_name, is_smoke

    cfg, adapter, plan = pipe.config, pipe.adapter, pipe.plan
    settings, model, device = cfg.bench, adapter.model, adapter.device
    n = settings.new_tokens
    inputs = adapter.synthetic_inputs(batch_size, settings.prompt_tokens, torch.Generator().manual_seed(cfg.seed))
    text_cfg = model.config.get_text_config(decoder=True)
    # Exactly n tokens every time (random weights may emit EOS early); no tokenizer is needed for padding.
    gen = {"do_sample": False, "pad_token_id": text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0}

    def call(tokens, cache=None):
        extra = {"cache": cache} if cache is not None else {}
        return adapter.generate(inputs, plan, max_new_tokens=tokens, min_new_tokens=tokens, **gen, **extra)

    ttft, e2e, decode, select = [], [], [], []
    with torch.inference_mode():
        for _ in range(settings.warmup):
            call(1)
            call(n)
        reset_peak(device)
        for _ in range(settings.repeats):
            first, _ = timed(lambda: call(1), device)
            cache = DynamicCache(config=model.config)  # ours, so that its size can be read after generate
            total, (new_ids, records) = timed(lambda cache=cache: call(n, cache), device)
            if new_ids.shape[1] != n:
                raise RuntimeError(f"generate returned {new_ids.shape[1]} new tokens, expected {n}")
            ttft.append(first)
            e2e.append(total)
            if n > 1:
                decode.append((total - first) / (n - 1))
            select.append(sum(r.select_seconds for r in records))
        peak = peak_bytes(device)

    measured = measured_kv_bytes(cache, model.config)
    num_visual = max(r.num_visual for r in records)
    ids = inputs["input_ids"]
    if cross_layer_indices(model.config):
        # Mllama carries the image only in the cross layers, whose unpruned cache also holds empty (padding) tiles.
        image_tokens = 0
        cached_visual = math.prod(inputs["pixel_values"].shape[1:3]) * tile_tokens(model.config)
    else:
        image_tokens, cached_visual = int((ids[0] == model.config.image_token_id).sum()), num_visual
    analytic = analytic_kv_bytes(
        model.config, batch_size=batch_size, text_tokens=ids.shape[1] - image_tokens, num_visual=cached_visual,
        num_kept=cached_visual if plan.is_noop else max(r.num_kept for r in records), layout=layout_for(plan.strategy, plan.options, model.config),
        element_size=model.dtype.itemsize, decoded=n - 1,  # the last new token is never fed back
    )
    ttft_s, ttft_spread = median_spread(ttft)
    e2e_s, e2e_spread = median_spread(e2e)
    decode_s, decode_spread = median_spread(decode) if decode else (None, None)
    return {
        "run": cfg.name, "model": cfg.model.path, "family": adapter.family, "strategy": plan.strategy.name,
        "keep_ratio": plan.keep_ratio, "batch_size": batch_size, "device": device_name(device),
        "dtype": str(model.dtype).replace("torch.", ""), "weights": cfg.model.weights, "smoke": is_smoke(cfg),
        "prompt_tokens": settings.prompt_tokens, "new_tokens": n, "repeats": settings.repeats,
        "num_visual": num_visual,
        "num_kept_mean": statistics.fmean(r.num_kept for r in records),
        "kept_fraction_mean": statistics.fmean(r.kept_fraction for r in records),
        "ttft_ms": ms(ttft_s), "ttft_ms_spread": ms(ttft_spread),
        "decode_ms_per_token": ms(decode_s), "decode_ms_per_token_spread": ms(decode_spread),
        "e2e_ms": ms(e2e_s), "e2e_ms_spread": ms(e2e_spread),
        "tokens_per_s": batch_size * n / e2e_s,
        "peak_memory_bytes": peak,
        "kv_self_bytes": measured["self"], "kv_cross_bytes": measured["cross"],
        "kv_self_bytes_analytic": analytic["self"], "kv_cross_bytes_analytic": analytic["cross"],
        "select_ms": ms(statistics.median(select)),
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
