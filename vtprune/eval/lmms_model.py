"""The one lmms-eval model vtprune registers: a loaded ``Pipeline`` behind lmms-eval's *simple* interface.

Simple, not chat: a simple request carries the task's prompt text and its images, which is exactly what
``Pipeline.generate(images, prompts)`` takes; the pipeline's adapter applies the model's own chat template,
so ``vtprune eval`` and ``vtprune generate`` build the same prompt. A chat request would hand us messages
that we would only flatten back into that text.

lmms-eval finds it through the ``lmms_eval.models`` entry point (``vtprune.eval.entry_point``), so its own CLI runs
``python -m lmms_eval --model vtprune --model_args config=X.yaml --tasks ...``; ``vtprune eval`` builds it
directly around an already loaded pipeline (``VtpruneLMM(pipeline=...)``) and hands the object to
``simple_evaluate``.

Generation settings, per request: the request's ``gen_kwargs`` (the task's ``generation_kwargs`` with
lmms-eval's ``--gen_kwargs`` merged over them by lmms-eval) win over the config's ``eval.generation``, which
fills in what neither sets. ``vtprune eval`` builds the model with ``generation=`` the config's
``eval.generation``, which then wins over the requests': the config decides and sweeps stay comparable across
tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path
from statistics import mean

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from vtprune.api import kept_padding

# model_args that override the YAML (lmms-eval's tracker takes results.json's model_name from `model=`).
OVERRIDES = ("model", "strategy", "keep_ratio", "seed")
ALLOWED_ARGS = ("config", *OVERRIDES, "batch_size", "max_batch_size", "device")

# lmms-eval request keys → transformers generate() keys; `until` is applied to the decoded text.
_GEN_KEYS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "repetition_penalty")


def _append_target_question(labeled_examples: list[dict], question: str, fewshot_as_multiturn: bool = False,
                            gen_prefix: str | None = None) -> None:
    """The question as the next user turn, or appended to the open user turn of a single-turn few-shot prompt."""
    last = labeled_examples[-1] if labeled_examples else None
    if fewshot_as_multiturn or last is None or last["role"] != "user":
        labeled_examples.append({"role": "user", "content": question})
    else:
        last["content"] += question
    if gen_prefix:
        labeled_examples.append({"role": "assistant", "content": gen_prefix})


def _patch_lmms_eval_chat_prompts() -> None:
    """lmms-eval 0.7.3's ``ConfigurableTask.fewshot_context`` calls ``self.append_target_question`` under
    ``--apply_chat_template``, a method that release lacks, so that flag fails for every simple model on every
    text-prompt task. Add it where it is missing (never replace one), until lmms-eval ships it.
    """
    from lmms_eval.api.task import ConfigurableTask

    if not hasattr(ConfigurableTask, "append_target_question"):
        ConfigurableTask.append_target_question = staticmethod(_append_target_question)


@dataclasses.dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning did; lmms-eval logs ``to_dict()`` per sample."""

    num_visual: int | None = None
    num_kept: int | None = None
    kept_fraction: float | None = None
    strategy: str | None = None
    keep_ratio: float | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for f in ("num_visual", "num_kept", "kept_fraction", "strategy", "keep_ratio"):
            out[f] = getattr(self, f)
        return out


def data_parallel_device(device: str, num_processes: int, local_rank: int) -> str:
    """Under data parallelism each process takes the GPU of its local rank; a CPU config stays on the CPU."""
    import torch

    if num_processes > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def request_generation(gen_kwargs: dict, override: dict | None = None) -> tuple[dict, list[str]]:
    """A request's ``gen_kwargs`` as ``generate()`` keywords (``override`` wins over them), and its stop strings.

    lmms-eval's convention (its HF models): ``temperature`` 0 means greedy, a positive one samples.
    """
    gen = {k: v for k, v in gen_kwargs.items() if k in _GEN_KEYS}
    if "temperature" in gen:
        temperature = float(gen.pop("temperature"))
        if temperature > 0:
            gen.setdefault("do_sample", True)
            gen["temperature"] = temperature
        else:
            gen["do_sample"] = False
    gen.update(override or {})
    if not gen.get("do_sample", True):
        for key in ("temperature", "top_p", "top_k"):
            gen.pop(key, None)
    until = gen_kwargs.get("until") or []
    return gen, [until] if isinstance(until, str) else [u for u in until if u]


def config_fingerprint(config) -> str:
    """sha256 of the resolved config: what lmms-eval's response cache must key on besides the YAML's path."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


class VtpruneLMM(lmms):
    is_simple = True

    def __init__(self, config=None, pipeline=None, batch_size=None, max_batch_size=None, device=None, progress=None,
                 generation=None, **args) -> None:
        """``config``: a YAML path (lmms-eval CLI), or ``pipeline``: a loaded one (vtprune's runner).

        ``batch_size`` / ``device`` are what lmms-eval's CLI passes to every model; they override the config,
        as do ``model``, ``strategy``, ``keep_ratio``, ``seed`` in ``--model_args``.
        ``generation``: ``generate()`` keywords that win over every request's (``vtprune eval``: the config's).
        ``progress(expect=n)`` is called with the number of requests coming, ``progress(advance=n)`` after each batch.
        """
        super().__init__()
        _patch_lmms_eval_chat_prompts()
        unknown = sorted(set(args) - set(OVERRIDES))
        if unknown:
            raise ValueError(f"vtprune model: unknown model_args {unknown} (allowed: {', '.join(ALLOWED_ARGS)})")
        from accelerate import Accelerator

        if pipeline is None:
            if config is None:
                raise ValueError("vtprune model: give --model_args config=X.yaml")
            from vtprune.config import load_config

            config_path, config = str(config), load_config(config, _sections(args, device))
        # Accelerator(cpu=True) is what makes a torchrun / accelerate launch on CPUs one gloo group.
        on_cpu = _on_cpu(pipeline.adapter.device.type if pipeline else config.model.device)
        accelerator = Accelerator(cpu=on_cpu)
        if pipeline is None:
            import vtprune

            device = data_parallel_device(config.model.device, accelerator.num_processes, accelerator.local_process_index)
            if device != config.model.device:
                config = config.replace(model={"device": device})
            pipeline = vtprune.load(config)
            _check_response_cache(config_path, pipeline.config)
        self.pipeline = pipeline
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.batch_size_per_gpu = _batch_size(batch_size, pipeline.config.eval.batch_size)
        self.progress = progress
        self.generation = generation
        self.stats: dict = {}  # (task, doc_id) -> GenerationResult with the stop-trimmed text

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.pipeline.adapter.device

    @property
    def chat_template(self) -> str | None:
        """The template the adapter formats every prompt with (lmms-eval records it in results.json)."""
        return getattr(self.pipeline.processor, "chat_template", None)

    @property
    def tokenizer_name(self) -> str:
        return self.pipeline.config.model.path

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the messages as one prompt text; the adapter then applies the model's template.

        The adapter always renders the model's own chat template with the image first, so here the messages
        (a ``--system_instruction``, few-shot turns, the question) are only joined, never templated twice.
        """
        return "\n".join(str(m["content"]) for m in chat_history if m.get("content"))

    def generate_until(self, requests) -> list[GenerationResult]:
        outputs: list[GenerationResult | None] = [None] * len(requests)
        if self.progress is not None:
            self.progress(expect=len(requests))
        args = [(i, r.args) for i, r in enumerate(requests)]
        # One task/split/gen_kwargs per batch: doc_to_visual and the generation settings belong to a task.
        for _, group in itertools.groupby(args, key=_batch_key):
            group = list(group)
            if self.batch_size > 1:
                # Most visual tokens first (lmms-eval's own models sort by length alike): a batch of like-sized
                # images pads few tokens, and one that does not fit in memory fails at the start.
                group.sort(key=lambda indexed: self._visual_tokens(*indexed[1][2:6]), reverse=True)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                for (i, _), out in zip(chunk, self._generate_chunk([a for _, a in chunk])):
                    outputs[i] = out
                if self.progress is not None:
                    self.progress(advance=len(chunk))
        return outputs

    def _visual_tokens(self, doc_to_visual, doc_id, task, split) -> int:
        """The visual tokens a document's image will make, from its size alone."""
        from PIL import Image

        docs = self.task_dict[task][split]
        visual = _doc_visual(doc_to_visual, docs, task, doc_id)
        if not isinstance(visual, Image.Image):  # a PIL image knows its size before its pixels are decoded
            visual = _doc_image(doc_to_visual, docs, task, doc_id)
        width, height = visual.size
        return self.pipeline.adapter.visual_tokens_for_size(height, width)

    def _generate_chunk(self, chunk) -> list[GenerationResult]:
        contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        task, split = tasks[0], splits[0]
        images = [_doc_image(fn, self.task_dict[task][split], task, doc_id) for fn, doc_id in zip(doc_to_visual, doc_ids)]
        gen, until = request_generation(gen_kwargs[0], self.generation)
        start = time.perf_counter()
        results = self.pipeline.generate(images, list(contexts), **gen)
        pruning = self.pipeline.config.pruning
        _log_throughput(results, time.perf_counter() - start, pruning)
        outputs = []
        for result, doc_id, context in zip(results, doc_ids, contexts):
            text = result.text
            for stop in until:
                text = text.split(stop)[0]
            text = text.strip()
            self.stats[(task, doc_id)] = dataclasses.replace(result, text=text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs[0]), text)
            counts = PrunedTokenCounts(
                input_tokens=result.input_tokens, output_tokens=result.output_tokens, num_visual=result.num_visual,
                num_kept=result.num_kept, kept_fraction=result.kept_fraction, strategy=pruning.strategy,
                keep_ratio=pruning.keep_ratio,
            )
            outputs.append(GenerationResult(text=text, token_counts=counts))
        return outputs

    def loglikelihood(self, requests):
        raise NotImplementedError("vtprune model: only generate_until tasks are supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune model: multi-round tasks are not supported")


def _doc_visual(doc_to_visual, docs, task: str, doc_id: int):
    """The one visual of a document as the task gives it (a PIL image, a path, bytes)."""
    from vtprune.errors import VtpruneError

    try:
        visuals = doc_to_visual(docs[doc_id])
    except (OSError, SyntaxError, ValueError) as exc:  # the dataset decodes the image file here
        raise VtpruneError(f"eval data: task {task} doc {doc_id}: image is not readable ({exc})") from None
    if len(visuals) != 1:
        raise ValueError(f"vtprune model: task {task} doc {doc_id} has {len(visuals)} images; one is supported")
    return visuals[0]


def _doc_image(doc_to_visual, docs, task: str, doc_id: int):
    """The one image of a document, decoded whole; a broken one is an error naming the task and document."""
    from vtprune.api import read_image
    from vtprune.errors import VtpruneError

    visual = _doc_visual(doc_to_visual, docs, task, doc_id)
    try:
        return read_image(visual)
    except VtpruneError as exc:
        raise VtpruneError(f"eval data: task {task} doc {doc_id}: {exc}") from None


def _batch_key(indexed_args) -> tuple:
    """Requests that may share a batch: same task, split and generation settings."""
    _, (_, gen_kwargs, _, _, task, split) = indexed_args
    return task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)


def _log_throughput(results, seconds: float, pruning) -> None:
    """lmms-eval's throughput log (results.json ``throughput``): its averages include the pruning figures."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    new_tokens = sum(r.output_tokens for r in results)
    log_metrics(
        total_elapsed_time=seconds, total_gen_tokens=new_tokens, avg_speed=new_tokens / seconds if seconds else 0.0,
        additional_metrics={
            "num_visual": mean(r.num_visual for r in results), "num_kept": mean(r.num_kept for r in results),
            "kept_fraction": mean(r.kept_fraction for r in results), "keep_ratio": pruning.keep_ratio,
            "kept_padding": kept_padding([r.num_kept for r in results], [r.kept_slots for r in results]),
        },
    )


def _batch_size(value, default: int) -> int:
    if value is None:
        return int(default)
    if isinstance(value, str) and value.startswith("auto"):
        raise ValueError(
            f"vtprune model: --batch_size {value} is not supported: give a number (the config's eval.batch_size is "
            f"{default}); vtprune pads kept visual tokens per batch, so measure the batch you want with `vtprune bench`"
        )
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"vtprune model: --batch_size {value!r} must be a positive integer") from None
    if size < 1:
        raise ValueError(f"vtprune model: --batch_size {value!r} must be a positive integer")
    return size


def _sections(args: dict, device) -> dict:
    """``--model_args`` overrides (and lmms-eval's ``--device``) as config sections."""
    model = {k: v for k, v in (("path", args.get("model")), ("device", device)) if v is not None}
    pruning = {k: v for k, v in (("strategy", args.get("strategy")), ("keep_ratio", args.get("keep_ratio"))) if v is not None}
    if "keep_ratio" in pruning:
        pruning["keep_ratio"] = float(pruning["keep_ratio"])
    sections = {"model": model, "pruning": pruning}
    if args.get("seed") is not None:
        sections["seed"] = int(args["seed"])
    return {k: v for k, v in sections.items() if v != {}}


def _on_cpu(device: str) -> bool:
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _check_response_cache(config_path: str, config) -> None:
    """Refuse lmms-eval's ``--use_cache`` folder when the config changed since its answers were cached.

    lmms-eval keys cached answers on ``--model_args`` (here the YAML's *path*) and the task, not on the YAML's
    contents, so after an edit it would hand back the old answers. vtprune keeps the fingerprint of the
    resolved config each (cache folder, model_args) was filled with next to the cache, and stops on a change.
    """
    import sys

    cache_root = _cli_option(sys.argv, "--use_cache")
    if cache_root is None:
        return
    root = Path(cache_root)
    root = root.parent if root.suffix == ".db" else root
    record = root / "vtprune-fingerprints.json"
    seen = json.loads(record.read_text()) if record.is_file() else {}
    key = _cli_option(sys.argv, "--model_args") or config_path
    fingerprint = config_fingerprint(config)
    if seen.get(key, fingerprint) != fingerprint:
        raise ValueError(
            f"vtprune model: {config_path} changed since lmms-eval cached answers for it in {root}; its cache would "
            f"return stale answers. Use another --use_cache folder, or delete {root} to start it afresh"
        )
    if key not in seen:
        from vtprune.results import write_json

        write_json(record, {**seen, key: fingerprint})


def _cli_option(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` / ``--name=V`` in lmms-eval's command line, if given."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None
