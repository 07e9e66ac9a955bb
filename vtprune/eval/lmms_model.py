"""The one lmms-eval model vtprune registers: a loaded ``Pipeline`` behind lmms-eval's *simple* interface.

Simple, not chat: a simple request carries the task's prompt text and its images, which is exactly what
``Pipeline.generate(images, prompts)`` takes; the pipeline's adapter applies the model's own chat template,
so ``vtprune eval`` and ``vtprune generate`` build the same prompt. A chat request would hand us messages
that we would only flatten back into that text.

lmms-eval finds it through the ``lmms_eval.models`` entry point (``manifest``), so its own CLI runs
``lmms-eval --model vtprune --model_args config=X.yaml --tasks ...``; ``vtprune eval`` builds it directly
around an already loaded pipeline (``VtpruneLMM(pipeline=...)``) and hands the object to ``simple_evaluate``.
"""

from __future__ import annotations

import dataclasses
import itertools

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

CLASS_PATH = "vtprune.eval.lmms_model.VtpruneLMM"


def manifest() -> ModelManifest:
    """Entry-point payload (``[project.entry-points."lmms_eval.models"] vtprune = ...:manifest``)."""
    return ModelManifest(model_id="vtprune", simple_class_path=CLASS_PATH)


class VtpruneLMM(lmms):
    is_simple = True

    def __init__(self, config=None, pipeline=None, batch_size=None, device=None, progress=None, **unknown) -> None:
        """``config``: a YAML path (lmms-eval CLI), or ``pipeline``: a loaded one (vtprune's runner).

        ``batch_size`` / ``device`` are what lmms-eval's CLI passes to every model; they override the config.
        ``progress(n)`` is called after each batch with the number of samples done.
        """
        super().__init__()
        if unknown:
            raise ValueError(
                f"vtprune model: unknown model_args {sorted(unknown)} (allowed: config, batch_size, device)"
            )
        from accelerate import Accelerator

        accelerator = Accelerator()
        if pipeline is None:
            if config is None:
                raise ValueError("vtprune model: give model_args config=X.yaml")
            import vtprune

            overrides = {}
            if accelerator.num_processes > 1:
                # Data parallel: every process holds a whole model on its own GPU, as lmms-eval's HF models do.
                overrides["device"] = f"cuda:{accelerator.local_process_index}"
            elif device is not None:
                overrides["device"] = device
            pipeline = vtprune.load(config, **overrides)
        self.pipeline = pipeline
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.batch_size_per_gpu = int(batch_size or pipeline.config.eval.batch_size)
        self.progress = progress
        self.stats: dict = {}  # (task, doc_id) -> GenerationResult with the stop-trimmed text

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.pipeline.adapter.device

    def generate_until(self, requests) -> list[str]:
        outputs: list[str] = [""] * len(requests)
        args = [(i, r.args) for i, r in enumerate(requests)]
        # One task/split per batch: doc_to_visual and the stop strings belong to a task.
        for _, group in itertools.groupby(args, key=lambda a: (a[1][4], a[1][5])):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                for (i, _), text in zip(chunk, self._generate_chunk([a for _, a in chunk])):
                    outputs[i] = text
                if self.progress is not None:
                    self.progress(len(chunk))
        return outputs

    def _generate_chunk(self, chunk) -> list[str]:
        contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        task, split = tasks[0], splits[0]
        images = []
        for fn, doc_id in zip(doc_to_visual, doc_ids):
            visuals = fn(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise ValueError(f"vtprune model: task {task} doc {doc_id} has {len(visuals)} images; one is supported")
            images.append(visuals[0])
        until = gen_kwargs[0].get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        # The config's generation settings win over the task's (max_new_tokens 4096 for llava_in_the_wild):
        # one place decides what a run generates, and sweeps stay comparable across tasks.
        results = self.pipeline.generate(images, list(contexts))
        texts = []
        for result, doc_id, context in zip(results, doc_ids, contexts):
            text = result.text
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            text = text.strip()
            texts.append(text)
            self.stats[(task, doc_id)] = dataclasses.replace(result, text=text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs[0]), text)
        return texts

    def loglikelihood(self, requests):
        raise NotImplementedError("vtprune model: only generate_until tasks are supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune model: multi-round tasks are not supported")
