"""What every strategy shares: the signals it is given, its declared options, the budget rule, the registry.

A strategy is a pure function ``fn(signals, budgets, **options) -> list[LongTensor]``: for each sample of the
batch, the sorted indices of the visual tokens to keep. It never touches a model; an adapter computes the
signals the strategy declares in ``needs`` and applies the kept set. It names no model family: it runs on every
family that provides the signals it needs (``Adapter.provides``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vtprune.registry import Registry

#: Signals an adapter may be asked for (``needs``). Tensors are batch-first, padded to the longest sample.
SIGNALS = {
    "groups": "[B, N] tile / crop id of each visual token (uniform spacing is per group)",
    "cross_attention": "[B, H, N] per-head attention of the prompt's text rows to each visual token in the first "
    "cross-attention layer, averaged over the rows (cross-attention models)",
    "last_token_attention": "[B, H, N] per-head attention of the last prompt token to each visual token at the LLM "
    "layer where an in-LLM strategy prunes (self-attention models)",
    "cls_attention": "[B, N] vision encoder CLS→patch attention, averaged over heads",
    "features": "[B, N, D] visual tokens as the language model sees them (projector outputs)",
    "text_embeds": "[B, T, D] language-model input embeddings of the prompt's text tokens (with text_valid)",
}


@dataclass
class Signals:
    """Inputs of a strategy for one batch. ``valid[b, i]`` is False for padding (never a candidate)."""

    valid: torch.Tensor  # [B, N] bool
    groups: torch.Tensor | None = None  # [B, N] long, -1 on padding
    cross_attention: torch.Tensor | None = None  # [B, H, N]
    last_token_attention: torch.Tensor | None = None  # [B, H, N]
    cls_attention: torch.Tensor | None = None  # [B, N]
    features: torch.Tensor | None = None  # [B, N, D]
    text_embeds: torch.Tensor | None = None  # [B, T, D]
    text_valid: torch.Tensor | None = None  # [B, T] bool
    #: one seeded generator per sample (random strategies); seeded from the sample itself so that a
    #: sample's selection does not depend on which other samples share its batch
    generators: list[torch.Generator] | None = None

    @property
    def num_valid(self) -> torch.Tensor:
        return self.valid.sum(dim=1)


@dataclass(frozen=True)
class Option:
    """A declared strategy option: its default fixes its type; ``choices`` or ``bounds`` (inclusive) restrict it."""

    default: Any
    help: str = ""
    choices: tuple | None = None
    bounds: tuple | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., list[torch.Tensor]]
    needs: tuple[str, ...] = ()
    options: dict[str, Option] = field(default_factory=dict)
    #: where the strategy's signals exist on a self-attention model: "pre_llm" (before the language model) or
    #: "in_llm" (inside it). On cross-attention models (mllama) every strategy prunes at the cross-attention layers.
    stage: str = "pre_llm"
    #: defaults of the placement settings (``vtprune.placement``), e.g. fastv's ``{"layer": 2}``: the adapter owns
    #: where pruning happens, the strategy only proposes its authors' default
    placement: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def select(self, signals: Signals, keep_ratio: float, **options) -> list[torch.Tensor]:
        opts = {name: opt.default for name, opt in self.options.items()} | options
        kept = self.fn(signals, budgets(signals.num_valid, keep_ratio), **opts)
        return [k.sort().values for k in kept]


STRATEGIES: Registry[Strategy] = Registry("strategy", "pruning.strategy")


def register_strategy(name: str, *, needs=(), options=None, stage="pre_llm", placement=None):
    unknown = [n for n in needs if n not in SIGNALS]
    if unknown:
        raise ValueError(f"strategy '{name}' needs unknown signal '{unknown[0]}' (known: {', '.join(SIGNALS)})")

    def wrap(fn):
        STRATEGIES.add(name, Strategy(name, fn, tuple(needs), dict(options or {}), stage, dict(placement or {})))
        return fn

    return wrap


def sample_generators(seed: int, keys: list[bytes]) -> list[torch.Generator]:
    """One generator per sample, seeded by the config seed and a digest of the sample's own inputs."""
    import zlib

    return [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key)) for key in keys]


def budget(num_valid: int, keep_ratio: float) -> int:
    """``ceil(keep_ratio · num_valid)``, at least 1. Rounded first so that 0.1·30 is 3, not 4."""
    return max(1, math.ceil(round(keep_ratio * num_valid, 6)))


def budgets(num_valid: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    return torch.tensor([budget(int(n), keep_ratio) for n in num_valid], dtype=torch.long)


def topk_valid(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores among valid positions of a 1-D score vector (ties → lower index)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, descending=True, stable=True).indices
    return order[: min(k, int(valid.sum()))]


def topk_per_sample(scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor) -> list[torch.Tensor]:
    """For each sample, the indices of its ``budgets[b]`` highest valid scores (``scores``: [B, N])."""
    return [topk_valid(scores[b], valid[b], int(k)) for b, k in enumerate(budgets.tolist())]
