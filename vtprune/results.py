"""The results layout (docs: Results layout): one folder per run, tidy JSONL rows, every file written atomically.

``results/<name>/``
- ``run.json``      — written LAST; its ``finished`` time marks the folder complete (a sweep redoes others).
  Keys: name, kind ("eval" | "bench" | "eval+bench" for a sweep point benchmarked after its eval), config (resolved), versions {vtprune, torch, transformers, lmms_eval,
  python}, device, dtype, git_commit, started, finished, smoke (True for tiny models: smoke figures only), micro
  (True for the trained micro models: micro-model figures), eval runs: tasks, limit, judge, fidelity {reference:
  the unpruned run's folder relative to this one's parent, or None with a note saying why}, kept_padding (the
  fraction of the batches' kept-token slots that were padding).
- ``metrics.jsonl`` — one row per (task, metric): run, model, family, strategy, keep_ratio, task, metric,
  value (None when unscored), stderr, n, scored (bool), kept_fraction_mean, num_visual_mean, num_kept_mean,
  equivalent_tokens_mean (None for pre-LLM strategies), smoke, micro, loyalty, top1_agreement, kl_mean, fidelity_n
  (None / 0 without an unpruned run to compare with; ``vtprune.fidelity``).
- ``samples.jsonl`` — one row per sample: task, doc_id, output, target, num_visual, num_kept (merged tokens
  included), num_merged, kept_fraction, kept_slots (the largest kept set of its batch: the slots it took), select_ms,
  first_topk {ids, logprobs: the first generated token's top-20},
  loyal, top1_agree, kl (fidelity to the unpruned run's sample of the same task and doc_id; None without one).
- ``bench.jsonl``   — one row per (strategy, keep_ratio, batch_size): run, model, family, strategy, keep_ratio,
  batch_size, device, dtype, weights, smoke, micro, prompt_tokens, new_tokens, repeats, num_visual, num_kept_mean,
  kept_fraction_mean, kept_padding (of the batch's kept-token slots, the padded ones), ttft_ms, decode_ms_per_token,
  e2e_ms (medians over rounds; each with a ``_spread`` column = IQR; decode is the median of the timed decode steps
  per round), tokens_per_s, peak_memory_bytes, kv_self_bytes,
  kv_cross_bytes, kv_self_bytes_analytic, kv_cross_bytes_analytic, select_ms, rounds, interleaved (True: the
  points of a batch size were measured in shuffled rounds), then per timing ``<figure>_ratio``, ``_ratio_lo``,
  ``_ratio_hi`` (median of the per-round ratios to the ``none`` row of the same round and its bootstrap 95 %
  interval; 1.0 for ``none``; None where the figure is) and noisy (True when the TTFT or decode interval is
  wider than ±10 % of its ratio, or there is one round: not a result), then ideal_ttft_speedup and
  ideal_decode_speedup (``none``'s bound over the point's, from the config for the point's own shape: FLOPs of
  vision tower + projector + prefill; bytes read per decode step, language-model weights + KV cache after prefill;
  1.0 for ``none``), ttft_efficiency and decode_efficiency (measured speed-up ``1 / <figure>_ratio`` over the ideal;
  None where the ratio is). A bench always holds a ``none`` row.

``pandas.read_json(path, lines=True)`` is the whole loader.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RUN_FILE = "run.json"


def umask() -> int:
    """The process umask, read from /proc where it can be: ``os.umask`` reads it only by setting it, which another
    thread creating a file at that moment would feel."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """A file object whose contents appear at ``path`` only once the block ends without an error: a temp file in
    the same folder, renamed over ``path``; on any error (a full disk included) the temp file is removed and the
    OSError names ``path``. The file gets the mode a plain ``open`` would (mkstemp's 0600 would hide results from
    the others sharing a results folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so a reader never sees half a file."""
    with atomic_file(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_complete(run_dir: str | Path) -> bool:
    run = Path(run_dir) / RUN_FILE
    if not run.is_file():
        return False
    try:
        meta = json.loads(run.read_text())
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(meta, dict) and bool(meta.get("finished"))


def is_smoke(config) -> bool:
    return config.model.path.startswith("tiny:")


def is_micro(config) -> bool:
    """A micro model trained on vtprune's synthetic tasks: its figures are real, but about those tasks only."""
    return config.model.path.startswith("micro:")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("vtprune", "torch", "transformers", "lmms_eval", "vllm"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout, else ``VTPRUNE_GIT_COMMIT`` (scripts/bench_gpu.sh: a GPU machine gets no .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VTPRUNE_GIT_COMMIT")
    return out.stdout.strip() or os.environ.get("VTPRUNE_GIT_COMMIT")


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_metadata(config, kind: str, device, dtype, started: str) -> dict:
    """The run.json contents; call with ``finished`` added once every other file is written."""
    return {
        "name": config.name,
        "kind": kind,
        "config": config.to_dict(),
        "versions": versions(),
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "git_commit": git_commit(),
        "started": started,
        "finished": None,
        "smoke": is_smoke(config),
        "micro": is_micro(config),
    }
