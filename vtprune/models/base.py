"""What every model adapter shares: the per-sample record, the pruning plan, the family registry, loading.

An adapter wraps one transformers model family. It turns images + prompts into model inputs, computes the
signals a strategy declares, applies the kept set, and reports per sample what was kept. Hooks, if any,
live only inside ``with adapter.applied(...)`` for one call and are removed on exit, so a pruned and an
unpruned run can share one model in one process.

Pipelines over one model share it, hooks included: every call holds the model (a lock per model object), so
calls from several threads run one at a time, each as if alone, and a call from the thread whose hooks are
on the model (from inside a hook, or inside an open ``applied`` context) is refused instead of running
through them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.errors import ConfigError, VtpruneError
from vtprune.placement import Placement, resolve_placement
from vtprune.registry import Registry
from vtprune.strategies.base import Selection, Signals, Strategy


@dataclass
class SampleRecord:
    """What happened to one sample's visual tokens."""

    kept: list[int]  # sorted indices into the model's full visual-token sequence of this sample that stay
    num_visual: int  # candidates: padding (empty tiles) excluded
    select_seconds: float = 0.0  # scoring + selection, this sample's share of the batch
    equivalent_tokens: float | None = None  # in-LLM strategies: (K·N + (L−K)·kept) / L
    merged: list[int] = field(default_factory=list)  # the slots of ``kept`` that carry a merged token
    stage_kept: list[int] = field(default_factory=list)  # in-LLM: tokens kept after each stage (the last: num_kept)

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    @property
    def kept_fraction(self) -> float:
        return self.num_kept / self.num_visual if self.num_visual else 1.0


@dataclass
class PrunePlan:
    """A strategy at a keep ratio with its options, and the placement settings: what one call of an adapter applies.

    ``placement`` holds the settings as given (``pruning.placement``); the adapter resolves and checks them against
    its model (``Adapter.placement``)."""

    strategy: Strategy
    keep_ratio: float = 1.0
    options: dict = field(default_factory=dict)
    seed: int = 0
    placement: dict = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        return self.strategy.name == "none"

    def option(self, name: str):
        return self.options.get(name, self.strategy.options[name].default)

    def select(self, signals: Signals) -> tuple[list[Selection], float]:
        """Each sample's selection and the wall time of the selection (scoring inside the adapter is added by it)."""
        start = time.perf_counter()
        selections = self.strategy.selections(signals, self.keep_ratio, **self.options)
        return selections, time.perf_counter() - start

    def select_kept(self, signals: Signals, where: str) -> tuple[list[torch.Tensor], float]:
        """Kept indices only, for placements that cannot build merged tokens (yet): a merge is refused, not dropped."""
        selections, seconds = self.select(signals)
        if any(s.num_merged for s in selections):
            raise VtpruneError(f"pruning.strategy: '{self.strategy.name}' merges tokens, which vtprune builds only "
                               f"before the LLM, not {where}")
        return [s.kept for s in selections], seconds


@dataclass
class _ModelGuard:
    """Who holds one model object, and whether vtprune's hooks are on it (only ever while it is held)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: int | None = None  # thread id of the holder
    hooked: bool = False


# Keyed by the model itself, not the adapter: with_pruning pipelines (and any adapter built over the same
# model) share one guard, separately loaded models never wait for each other.
_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def _guard(model) -> _ModelGuard:
    with _GUARDS_LOCK:
        if model not in _GUARDS:
            _GUARDS[model] = _ModelGuard()
        return _GUARDS[model]


class Adapter:
    """Base of every model-family adapter. Families implement ``_generate``, ``_prefill_logits`` and, if they
    hook the model, ``add_hooks``; the public calls hold the model around them."""

    family: ClassVar[str]
    model_class: ClassVar[str]  # transformers class name
    #: transformers ``model_type`` values this adapter serves
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the language model reads the image through cross-attention layers (mllama), not as tokens in its sequence
    cross_attention: ClassVar[bool] = False

    #: the tiny model's recipe (``build_tiny``, see ``vtprune.models.tiny``): its language model's decoder layers,
    #: its tokenizer's named tokens and the special tokens it adds to the shared ones
    tiny_text_layers: ClassVar[int | None] = None
    tiny_token_names: ClassVar[dict] = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tiny_specials: ClassVar[tuple[str, ...]] = ()
    #: the video processor class vLLM's transformers needs beside a checkpoint vtprune saves (``write_serving_files``)
    video_processor: ClassVar[str | None] = None

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    @classmethod
    def load_processor(cls, path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, images, prompts):
        """Model inputs for one image + one prompt per sample, chat template applied, left padding."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts: give one image per prompt")
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
            )
            for p in prompts
        ]
        # Left padding for this batch only (a per-call argument): the caller's tokenizer keeps its padding_side.
        inputs = self.processor(
            text=texts, images=self._images_arg(images), padding=True, padding_side="left", return_tensors="pt"
        )
        return inputs.to(self.device)

    def _images_arg(self, images):
        return images

    @classmethod
    def write_serving_files(cls, path) -> None:
        """Files beside a checkpoint vtprune saves (tiny, micro) that vLLM needs: its transformers (5.19) loads the
        Qwen2.5-VL and LLaVA-OneVision processors only with a video processor, which vtprune's image-only loaders
        drop (``video_preprocessor_config.json``, from the image processor's settings; vtprune sends no video)."""
        if cls.video_processor is not None:
            write_video_processor_config(path, cls.video_processor)

    @classmethod
    def build_tiny(cls, tokenizer, vocab: int, text=None, vision=None):
        """(model, processor) of the family's ``tiny:`` model, from the seeded tokenizer ``vtprune.models.tiny`` trained;
        ``text`` / ``vision`` (families that take them) override entries of the language and vision configs. A family
        has a tiny model when its own class defines this."""
        raise NotImplementedError

    # -- holding the model ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the model: calls from other threads wait; this thread may nest calls unless our hooks are on."""
        guard = _guard(self.model)
        me = threading.get_ident()
        if guard.owner == me:
            if guard.hooked:
                raise VtpruneError(
                    f"{self.family}: this thread already has pruning hooks on the model (a call from inside a hook, "
                    "or inside an open `adapter.applied(...)` context); the call would run through them and compute "
                    "wrong results: make it after that context exits, or on a separately loaded model"
                )
            yield
            return
        with guard.lock:
            guard.owner = me
            try:
                yield
            finally:
                guard.owner = None

    @contextlib.contextmanager
    def applied(self, inputs, plan: PrunePlan):
        """The hooks of ``plan`` on the model for one call on ``inputs``; yields the per-call state.

        The model is held until the context exits, when every hook is removed (also after an error).
        """
        with self.exclusive():
            guard = _guard(self.model)
            handles: list = []
            guard.hooked = True
            try:
                yield self.add_hooks(inputs, plan, handles)
            finally:
                guard.hooked = False
                for handle in handles:
                    handle.remove()

    def placement(self, plan: PrunePlan) -> Placement:
        """Where ``plan`` prunes on this model: its settings over the strategy's defaults, bounded by the config."""
        return resolve_placement(plan.strategy, plan.placement, cross_attention=self.cross_attention,
                                 decoder_layers=self.model.config.get_text_config(decoder=True).num_hidden_layers)

    def add_hooks(self, inputs, plan: PrunePlan, handles: list):
        """Register the hooks of ``plan``, appending each handle to ``handles``; return the per-call state.

        Only ``applied`` calls this: it removes the handles."""
        raise ValueError(f"{self.family}: '{plan.strategy.name}' does not hook the model")

    # -- calls ---------------------------------------------------------------------------------------------

    def generate(self, inputs, plan: PrunePlan, **gen) -> tuple[torch.Tensor, list[SampleRecord]]:
        """New token ids ``[B, T_new]`` and one record per sample."""
        with self.exclusive():
            return self._generate(inputs, plan, **gen)

    def prefill_logits(self, inputs, plan: PrunePlan) -> tuple[torch.Tensor, list[SampleRecord]]:
        """Logits ``[B, V]`` at the last prompt position, and one record per sample."""
        with self.exclusive():
            return self._prefill_logits(inputs, plan)

    def _generate(self, inputs, plan: PrunePlan, **gen) -> tuple[torch.Tensor, list[SampleRecord]]:
        raise NotImplementedError

    def _prefill_logits(self, inputs, plan: PrunePlan) -> tuple[torch.Tensor, list[SampleRecord]]:
        raise NotImplementedError

    def token_layout(self, inputs, b: int):
        """Where sample ``b``'s visual tokens sit on the image the model saw (``vtprune.models.layout``)."""
        raise NotImplementedError

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        """Visual tokens of one image at the model's largest input, from its config alone (``cost``, ``kv``)."""
        raise NotImplementedError

    def visual_tokens_for_size(self, height: int, width: int) -> int:
        """Visual tokens the processor makes of one ``height × width`` image, without processing it: what the eval
        sorts requests by, so that a batch holds like-sized images and pads few tokens. The processor's own count
        (transformers' ``_get_num_multimodal_tokens``, which vLLM also relies on), else the pixel count, which
        orders images alike wherever the count grows with the image."""
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is not None:
            try:
                return int(count(image_sizes=[[height, width]])["num_image_tokens"][0])
            except (AttributeError, KeyError, TypeError, ValueError):  # a private API: its shape may move
                pass
        return height * width

    def synthetic_inputs(self, batch_size: int, prompt_tokens: int, generator: torch.Generator | None = None):
        """Random pixels + a fixed-length prompt for benchmarks: no tokenizer or processor needed."""
        raise NotImplementedError

    def synthetic_words(self, batch_size: int, count: int, generator, *specials: int) -> torch.Tensor:
        """``count`` random text token ids per sample, none of them ``specials`` or the pad, BOS and EOS ids: a
        config may hold several EOS ids (LLaMA-3.2-Vision lists three)."""
        text = self.model.config.get_text_config(decoder=True)
        skip: set[int] = set()
        for ids in (*specials, text.pad_token_id, text.bos_token_id, text.eos_token_id):
            skip.update(ids if isinstance(ids, (list, tuple)) else [ids])
        vocab = [t for t in range(min(text.vocab_size, 32000)) if t not in skip]
        return torch.tensor(vocab)[torch.randint(len(vocab), (batch_size, count), generator=generator)]

    def on_model(self, inputs: dict) -> dict:
        """``inputs`` on the model's device, floating tensors in its dtype."""
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """Multiply-adds × 2 of the vision tower and projector for one synthetic image (``synthetic_inputs``), from
        the config alone: the same at every keep ratio, the part of the time to first token pruning cannot save."""
        raise NotImplementedError

    @classmethod
    def resized_vision_flops(cls, hf_config, keep_ratio: float) -> int:
        """``vision_flops`` when a strategy that merges in the input space (``downsample``) runs at ``keep_ratio``:
        the same as unpruned on a fixed-resolution tower, which sees the whole image whatever follows it."""
        return cls.vision_flops(hf_config)

    # -- signals -------------------------------------------------------------------------------------------

    #: self-attention families: the signals only an in-LLM strategy gets (computed inside the LLM), and those only
    #: a strategy placed inside the vision tower gets; the others are computed before the LLM. None: the family
    #: prunes at one point whatever a strategy's stage (mllama).
    in_llm_signals: ClassVar[tuple[str, ...] | None] = None
    vision_signals: ClassVar[tuple[str, ...]] = ()
    #: where such a family prunes, for `vtprune list strategies`
    prunes_at: ClassVar[str | None] = None

    @classmethod
    def provides(cls, stage: str | None = None) -> tuple[str, ...]:
        """The signals this family computes for strategies (of ``stage``): one ``signal_<name>(context, signals)``
        method each; a family that cannot compute one it inherits sets that method to None."""
        names = sorted(name[len("signal_") :] for name in dir(cls)
                       if name.startswith("signal_") and getattr(cls, name) is not None)
        if stage is None or cls.in_llm_signals is None:
            return tuple(names)

        def where(name):
            return "in_llm" if name in cls.in_llm_signals else "vision" if name in cls.vision_signals else "pre_llm"

        return tuple(n for n in names if where(n) == stage)

    @classmethod
    def usable_signals(cls, strategy: Strategy) -> set[str]:
        """What the family computes where ``strategy`` selects (before the LLM too, for one that also does)."""
        return set(cls.provides(strategy.stage)) | (set(cls.provides("pre_llm")) if strategy.before_llm else set())

    @classmethod
    def needs_at(cls, strategy: Strategy, stage: str) -> tuple[str, ...]:
        """The signals ``strategy`` needs at ``stage``: all of them, but for one that selects both before and inside
        the LLM (VScan), only those computed there."""
        if not strategy.before_llm:
            return strategy.needs
        return tuple(n for n in strategy.needs if n in cls.provides(stage))

    @classmethod
    def runs(cls, strategy: Strategy) -> bool:
        """A strategy runs on a family when the family provides every signal it needs where it prunes."""
        return set(strategy.needs) <= cls.usable_signals(strategy)

    @classmethod
    def check_strategy(cls, strategy: Strategy) -> None:
        missing = [name for name in strategy.needs if name not in cls.usable_signals(strategy)]
        if missing:
            from vtprune.strategies import STRATEGIES

            usable = [name for name, s in STRATEGIES.items() if cls.runs(s)]
            raise ConfigError(
                f"pruning.strategy: '{strategy.name}' needs the signal '{missing[0]}', which model family "
                f"'{cls.family}' does not provide {_WHERE[strategy.stage] if cls.in_llm_signals is not None else ''}"
                f"(allowed on {cls.family}: {', '.join(usable)})"
            )

    def compute_signals(self, context, valid: torch.Tensor, needs, generators=None) -> Signals:
        """The ``needs`` of a strategy, each from its provider; ``context`` is the family's per-call state."""
        signals = Signals(valid=valid, generators=generators)
        for name in needs:
            getattr(self, f"signal_{name}")(context, signals)
        return signals


_WHERE = {"pre_llm": "before the LLM ", "in_llm": "inside the LLM ", "vision": "inside the vision tower "}

FAMILIES: Registry[type[Adapter]] = Registry("model family", "model.family")


#: the image processor's settings a video processor shares (those present are copied)
VIDEO_PROCESSOR_KEYS = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "size",
                        "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "rescale_factor", "resample")


def write_video_processor_config(path, processor_type: str) -> None:
    """``video_preprocessor_config.json`` of class ``processor_type`` beside a saved checkpoint, from its image
    processor's settings."""
    import json
    from pathlib import Path

    path = Path(path)
    image = json.loads((path / "processor_config.json").read_text())["image_processor"]
    config = {"video_processor_type": processor_type, **{k: image[k] for k in VIDEO_PROCESSOR_KEYS if k in image}}
    (path / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def register_family(cls: type[Adapter]) -> type[Adapter]:
    FAMILIES.add(cls.family, cls)
    return cls


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, as generate() computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_keys(inputs) -> list[bytes]:
    """A digest key per sample (its unpadded token ids) for per-sample seeding."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    return [ids[b][mask[b]].cpu().numpy().tobytes() for b in range(len(ids))]
