"""``run_eval``: score a loaded pipeline on lmms-eval tasks and write ``results/<name>/`` (``vtprune.results``)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from statistics import mean

TASKS_DIR = Path(__file__).parent / "tasks"

# Tasks scored by a GPT judge; without a key their outputs are kept and their metrics marked unscored.
JUDGE_TASKS = ("llava_in_the_wild", "vtprune_llava_bench_mini")


def judge_available() -> bool:
    """The key lmms-eval's llava_in_the_wild judge reads (API_TYPE openai or azure)."""
    key = "AZURE_API_KEY" if os.environ.get("API_TYPE", "openai") == "azure" else "OPENAI_API_KEY"
    return bool(os.environ.get(key))


def task_manager(include_paths=()):
    """lmms-eval's own task index: its tasks, vtprune's mini tasks and the user's ``--include-path`` folders.

    Built once per process and folder list: indexing lmms-eval's ~2000 task YAMLs takes seconds, and a sweep
    evaluates many points. A YAML there that lmms-eval cannot index is a ConfigError naming the file.
    """
    folders = tuple(str(Path(p).resolve()) for p in include_paths)
    if not folders:
        return _task_manager(folders)
    try:
        return _task_manager(folders)
    except Exception as exc:  # noqa: BLE001 — lmms-eval indexes every YAML of the folders, and fails in any way
        from vtprune.errors import ConfigError

        problem = _broken_task_yaml(folders) or (
            f"lmms-eval cannot index the task YAMLs in {', '.join(folders)} ({type(exc).__name__}: {_one_line(exc)})")
        raise ConfigError(f"--include-path: {problem}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _broken_task_yaml(folders) -> str | None:
    """The first YAML of ``folders`` that lmms-eval's indexer cannot read as a task or group, and why."""
    from lmms_eval.utils import load_yaml_config

    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints"))
            for name in sorted(f for f in files if f.endswith(".yaml")):
                path = os.path.join(root, name)
                try:
                    config = load_yaml_config(path, mode="simple")
                    problem = None if isinstance(config, dict) else "not a mapping of task settings"
                except Exception as exc:  # noqa: BLE001 — what the indexer would raise, in any form
                    problem = _one_line(exc)
                if problem:
                    return f"{path} is not a readable task YAML ({problem})"
    return None


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...]):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=[str(TASKS_DIR), *include_paths], model_name="vtprune")


def check_tasks(names, include_paths=()) -> None:
    """Every name must be a task lmms-eval knows; an unknown one is one line with the closest names.

    vtprune's own listed tasks answer at once; any other name needs lmms-eval's index (seconds to build).
    """
    import difflib

    from vtprune.errors import ConfigError
    from vtprune.eval.tasks import TASKS

    unknown = [n for n in names if n not in TASKS]
    if not unknown and not include_paths:
        return
    # With include paths the index is built here, whatever the names: a broken YAML there must fail before the
    # model loads, not in the run.
    manager = task_manager(include_paths)
    known = manager.all_tasks
    for name in unknown:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "`vtprune list tasks` lists vtprune's; lmms-eval has ~2000"
            raise ConfigError(f"eval.tasks: unknown task '{name}' ({hint})")
    _check_included_tasks(manager, names, include_paths)


def _check_included_tasks(manager, names, include_paths) -> None:
    """Load the full YAML (includes, ``!function`` imports) of each named task that an include path provides:
    the indexer reads them without either."""
    from lmms_eval.utils import load_yaml_config

    from vtprune.errors import ConfigError

    folders = [str(Path(p).resolve()) for p in include_paths]
    for name in names:
        path = str((manager.task_index.get(name) or {}).get("yaml_path") or "")
        if not any(path.startswith(folder + os.sep) for folder in folders):
            continue
        try:
            load_yaml_config(path, mode="full")
        except Exception as exc:  # noqa: BLE001 — a user's task file: a missing include, function or module
            raise ConfigError(f"--include-path: task '{name}' in {path} does not load ({_one_line(exc)})") from None


def task_spec(name: str):
    """What ``simple_evaluate`` gets for one task: a mini task points at its generated dataset."""
    from vtprune.eval.mini import MINI_TASKS, mini_dataset_path

    if name in MINI_TASKS:
        return {"task": name, "dataset_path": str(mini_dataset_path(name))}
    return name


def run_eval(pipeline, tasks=None, limit=None, output_dir=None, progress: bool = True, include_paths=(),
             reference_dir=None) -> Path:
    """Run ``tasks`` (default: the config's) and write run.json (last), metrics.jsonl, samples.jsonl.

    Returns the run folder ``<output_dir>/<config name>``. Generation errors propagate: nothing is scored as "".
    ``include_paths``: folders of extra lmms-eval task YAMLs (lmms-eval's ``--include_path``).
    ``reference_dir``: where to look for the unpruned run (default: ``output_dir``); a sweep writes each point into
    a staging folder and moves it in place when it is complete.
    """
    from lmms_eval.evaluator import simple_evaluate
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vtprune.api import kept_padding
    from vtprune.eval.lmms_model import VtpruneLMM
    from vtprune.results import RUN_FILE, now, run_metadata, write_json, write_jsonl

    config = pipeline.config
    tasks = list(tasks or config.eval.tasks)
    check_tasks(tasks, include_paths)
    limit = limit if limit is not None else config.eval.limit
    run_dir = Path(output_dir or config.output_dir) / config.name
    started = now()
    # A finished run.json from an earlier run must not vouch for files this run is about to replace.
    (run_dir / RUN_FILE).unlink(missing_ok=True)

    manager = task_manager(include_paths)
    scored = [t for t in tasks if t not in JUDGE_TASKS or judge_available()]
    unscored = [t for t in tasks if t not in scored]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    show = progress and rank0
    console = Console(stderr=True)
    # Known before the first request, so that the bar does not grow as lmms-eval hands over each group of tasks.
    total = _request_count(manager, tasks, limit) if show else None
    # transient: the bar gives way to the score table, or to the one line of an error.
    # Off a terminal rich draws no bar but would still end it with an empty line: plain lines instead.
    with Progress(*columns, console=console, disable=not (show and console.is_terminal), transient=True) as bar:
        job = bar.add_task(f"eval {config.name}", total=total or 0)
        logged = _ProgressLines(console, f"eval {config.name}") if show and not console.is_terminal else None

        def report(advance=0, expect=0):
            if total is None:
                bar.update(job, total=bar.tasks[0].total + expect)
            bar.update(job, advance=advance)
            if logged is not None and advance:
                logged.update(bar.tasks[0])

        lm = VtpruneLMM(pipeline=pipeline, progress=report, generation=dict(config.eval.generation))
        outputs = {}
        for group, predict_only in ((scored, False), (unscored, True)):
            if not group:
                continue
            # predict_only: lmms-eval records the outputs and calls no judge (which would score a failed
            # request as a number).
            with contextlib.redirect_stderr(_WithoutProgressBars(sys.stderr)), _unreadable_images_named(group):
                result = simple_evaluate(
                    model=lm, tasks=[task_spec(t) for t in group], limit=limit, task_manager=manager,
                    log_samples=True, predict_only=predict_only, process_docs_parallel=1,
                    distributed_executor_backend="accelerate",
                    random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
                    verbosity="WARNING",
                )
            if result is not None:  # None on ranks > 0
                outputs.update({t: (result, predict_only) for t in group})
    stats = _gather(lm.stats)
    if lm.rank != 0:
        return run_dir

    metric_rows, sample_rows = [], []
    for name in tasks:
        result, predict_only = outputs[name]
        # Under data parallelism lmms-eval gathers samples rank by rank: order them as one process would.
        logged = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        task_stats = [stats[(name, s["doc_id"])] for s in logged]
        samples = [_sample_row(name, s, st) for s, st in zip(logged, task_stats)]
        sample_rows += samples
        names = _metric_names(manager, name)
        if predict_only or _judge_failed(name, logged):
            metrics = [(m, None, None) for m in names]
        else:
            metrics = _metrics(result["results"][name], names)
        for metric, value, stderr in metrics:
            metric_rows.append(_metric_row(pipeline, name, metric, value, stderr, samples, task_stats))
    fidelity = _fidelity(config, run_dir, Path(reference_dir or run_dir.parent), sample_rows, metric_rows)
    write_jsonl(run_dir / "samples.jsonl", sample_rows)
    write_jsonl(run_dir / "metrics.jsonl", metric_rows)
    adapter = pipeline.adapter
    meta = run_metadata(config, "eval", adapter.device, adapter.model.dtype, started)
    meta.update(tasks=tasks, limit=limit, judge=judge_available(), fidelity=fidelity,
                kept_padding=kept_padding([s.num_kept for s in stats.values()], [s.kept_slots for s in stats.values()]),
                finished=now())
    write_json(run_dir / RUN_FILE, meta)  # last: marks the folder complete
    return run_dir


def _request_count(manager, tasks, limit) -> int | None:
    """The generation requests this process will get for ``tasks``: documents (up to ``limit``, this rank's share
    under data parallelism) times the task's repeats; None when lmms-eval cannot build a task here (the run itself
    then reports why)."""
    from lmms_eval.tasks import get_task_dict

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def leaves(tree):
        for value in tree.values():
            value = value[1] if isinstance(value, tuple) else value
            if isinstance(value, dict):
                yield from leaves(value)
            elif value is not None:
                yield value

    try:
        with contextlib.redirect_stderr(_WithoutProgressBars(sys.stderr)):
            task_dict = get_task_dict([task_spec(t) for t in tasks], manager)
        count = 0
        for task in leaves(task_dict):
            docs = len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
            count += len(range(rank, docs, world)) * (task.get_config("repeats") or 1)
        return count
    except Exception:  # noqa: BLE001 — only the bar's total: simple_evaluate meets the same problem and names it
        return None


class _ProgressLines:
    """Eval progress as plain lines where no bar is drawn (a log file, CI, nohup): at most one line per tenth of
    the requests, and none closer than 10 s apart, so that a short run stays quiet and a long one is never silent."""

    def __init__(self, console, label: str):
        self.console, self.label = console, label
        self.step, self.last = 0, 0.0

    def update(self, task) -> None:
        if not task.total:
            return
        step = int(10 * task.completed / task.total)
        if step > self.step and task.completed < task.total and task.elapsed - self.last >= 10:
            self.step, self.last = step, task.elapsed
            eta = task.elapsed * (task.total - task.completed) / task.completed
            self.console.print(f"{self.label}: {task.completed:g}/{task.total:g} requests, {task.elapsed:.0f} s, "
                               f"ETA {eta:.0f} s", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _unreadable_images_named(tasks):
    """A broken image in the task data as one error: lmms-eval opens documents while it builds a task, before any
    reaches the model (which names the document of one it cannot decode)."""
    import traceback

    from vtprune.api import strict_image_decoding
    from vtprune.errors import VtpruneError

    # A half-grey picture would be scored as if it were the real one: vtprune's runs refuse truncated images.
    try:
        with strict_image_decoding():
            yield
    except (OSError, SyntaxError) as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        if not any("/PIL/" in f.filename for f in frames):
            raise
        raise VtpruneError(f"eval data: an image of task {', '.join(tasks)} is not readable ({exc})") from None


class _WithoutProgressBars:
    """stderr for lmms-eval's call: its tqdm bars (redrawn with a leading \\r) would cut through vtprune's bar."""

    def __init__(self, stream):
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        # tqdm ends a finished bar with a bare newline after its last \r redraw: drop that one too.
        self.dropped = text.startswith("\r") or (self.dropped and text == "\n")
        return len(text) if self.dropped else self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _judge_failed(task: str, logged: list[dict]) -> bool:
    """lmms-eval's llava judge scores a failed request [-1, -1], which its aggregation turns into 100%."""
    if task not in JUDGE_TASKS:
        return False
    return any((s.get("gpt_eval_llava_all") or {}).get("scores") == [-1, -1] for s in logged)


def _gather(stats: dict) -> dict:
    """Per-sample records live in each process; under data parallelism rank 0 needs them all."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats)
    return {k: v for part in parts for k, v in part.items()}


def _metrics(task_result: dict, names: list[str]) -> list[tuple[str, float | None, float | None]]:
    """(metric, value, stderr) for the task's declared metrics, from lmms-eval's ``"metric,filter"`` keys."""
    out = []
    for metric in names:
        key = next((k for k in task_result if k.partition(",")[0] == metric), None)
        filt = key.partition(",")[2] if key else "none"
        stderr = task_result.get(f"{metric}_stderr,{filt}")
        out.append((metric, _number(task_result.get(key)), _number(stderr)))
    return out


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric_names(manager, name: str) -> list[str]:
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(manager.task_index[name]["yaml_path"], mode="simple")
    return [m["metric"] for m in config.get("metric_list", [])]


def _sample_row(task: str, sample: dict, s) -> dict:
    return {
        "task": task, "doc_id": sample["doc_id"], "output": s.text, "target": _target(sample),
        "num_visual": s.num_visual, "num_kept": s.num_kept, "kept_fraction": s.kept_fraction,
        "num_merged": len(s.merged), "kept_slots": s.kept_slots, "select_ms": s.select_seconds * 1000,
        "first_topk": s.first_topk,
    }


# What must agree for one run's answers to be another's unpruned reference (the keep ratio and strategy aside).
_SAME_RUN = (("model", "path"), ("model", "weights"), ("model", "dtype"), ("eval", "generation"), ("seed",))


def _same_setup(a: dict, b: dict) -> bool:
    def get(config, keys):
        for key in keys:
            config = (config or {}).get(key)
        return config

    return all(get(a, keys) == get(b, keys) for keys in _SAME_RUN)


def find_reference(folder: Path, config, tasks, exclude: Path | None = None) -> Path | None:
    """The newest finished unpruned (``none``, keep 1.0) eval run of the same model, generation settings and seed
    in ``folder`` (or one level below, e.g. a sweep's ``none-1.0``) holding all of ``tasks``; None if there is none."""
    import json

    from vtprune.results import RUN_FILE

    wanted, found = json.loads(json.dumps(config.to_dict(), default=str)), []
    for path in [*folder.glob(f"*/{RUN_FILE}"), *folder.glob(f"*/*/{RUN_FILE}")]:
        if exclude is not None and path.parent.resolve() == exclude.resolve():
            continue
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict) or not run.get("finished") or not str(run.get("kind", "")).startswith("eval"):
            continue
        pruning = (run.get("config") or {}).get("pruning") or {}
        if pruning.get("strategy") != "none" or float(pruning.get("keep_ratio", 0)) != 1.0:
            continue
        if set(tasks) <= set(run.get("tasks") or []) and _same_setup(run.get("config"), wanted):
            found.append((run["finished"], path.parent))
    return max(found)[1] if found else None


def _fidelity(config, run_dir: Path, folder: Path, sample_rows: list[dict], metric_rows: list[dict]) -> dict:
    """Loyalty, top-1 agreement and KL against the unpruned run in ``folder`` (``vtprune.fidelity``), into both row
    lists. The unpruned run is its own reference. Returns what run.json records: the reference folder relative to
    ``folder``, or why there is none.
    """
    from vtprune.fidelity import compare
    from vtprune.results import read_jsonl

    tasks = sorted({r["task"] for r in sample_rows})
    pruning = config.pruning
    if pruning.strategy == "none" and pruning.keep_ratio == 1.0:
        reference, ref_rows = run_dir, sample_rows
    else:
        reference = find_reference(folder, config, tasks, exclude=run_dir)
        ref_rows = read_jsonl(reference / "samples.jsonl") if reference is not None else []
    # Without a reference nothing matches: every row gets the empty figures below.
    per_sample, by_task = compare(ref_rows, sample_rows)
    for row in sample_rows:
        row.update(per_sample.get((row["task"], row["doc_id"]), {"loyal": None, "top1_agree": None, "kl": None}))
    empty = {"loyalty": None, "top1_agreement": None, "kl_mean": None, "n": 0}
    for row in metric_rows:
        summary = by_task.get(row["task"], empty)
        row.update({k: v for k, v in summary.items() if k != "n"}, fidelity_n=summary["n"])
    if reference is None:
        return {"reference": None, "note": (
            f"no unpruned run (strategy none, keep 1.0) of {config.model.path} on {', '.join(tasks)} with the same "
            f"generation settings in {folder}: loyalty and KL not computed (run strategy none there first; "
            "`vtprune report` computes them once it exists)")}
    return {"reference": os.path.relpath(reference, folder), "note": None}


def _target(sample: dict):
    """The reference answers: VQA docs keep theirs in ``answers`` (their doc_to_target names a column they lack)."""
    answers = (sample.get("doc") or {}).get("answers")
    if isinstance(answers, list) and answers:
        return [a["answer"] if isinstance(a, dict) else a for a in answers]
    return _plain(sample.get("target"))


def _plain(value):
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)


def _metric_row(pipeline, task, metric, value, stderr, samples, stats) -> dict:
    from vtprune.results import is_micro, is_smoke

    config = pipeline.config
    equivalent = [s.equivalent_tokens for s in stats]
    return {
        "run": config.name, "model": config.model.path, "family": pipeline.adapter.family,
        "strategy": config.pruning.strategy, "keep_ratio": config.pruning.keep_ratio, "task": task,
        "metric": metric, "value": value, "stderr": stderr, "n": len(samples), "scored": value is not None,
        "kept_fraction_mean": _mean([s["kept_fraction"] for s in samples]),
        "num_visual_mean": _mean([s["num_visual"] for s in samples]),
        "num_kept_mean": _mean([s["num_kept"] for s in samples]),
        "equivalent_tokens_mean": None if any(e is None for e in equivalent) else _mean(equivalent),
        "smoke": is_smoke(config), "micro": is_micro(config),
    }


def _mean(values):
    return mean(values) if values else None
