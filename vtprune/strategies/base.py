"""What every strategy shares: the signals it is given, its declared options, the budget rule, the registry.

A strategy is a pure function ``fn(signals, budgets, **options)`` returning, for each sample of the batch, either
the indices of the visual tokens to keep (a LongTensor) or a ``Selection``: kept indices plus *merged* tokens
(VisionZip's contextual tokens, pooling), each given as weights over the sample's visual tokens. It never touches
a model; an adapter computes the signals the strategy declares in ``needs`` and applies the result, building each
merged vector from whatever vectors its placement sees (projector outputs before the LLM). It names no model
family: it runs on every family that provides the signals it needs (``Adapter.provides``).
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
    "vision_cls_attention": "[B, L, N] the CLS→patch attention of vision encoder layers 1..L (L: the layer whose "
    "output the projector reads), head mean, per crop / tile; 0 on tokens without a patch and on padding (towers "
    "with a CLS token)",
    "vision_attention": "[B, L, N] attention each visual token receives in vision encoder layers 1..L (L: the layer "
    "whose output the projector reads), averaged over heads and over every query row of its crop / tile (CLS "
    "included where the tower has one): HiPrune's global attention; 0 on tokens without a patch and on padding",
    "features": "[B, N, D] visual tokens as the language model sees them (projector outputs)",
    "text_embeds": "[B, T, D] language-model input embeddings of the prompt's text tokens (with text_valid)",
    "grid": "[B, N, 3] long (group, row, column) of each visual token on its tile / crop / image grid; -1 on "
    "tokens without a patch (newline, CLS) and on padding",
    "hidden_states": "[B, N, D] the LLM's hidden states of the visual tokens entering the layer where an in-LLM "
    "strategy prunes (self-attention models)",
    "text_hidden_states": "[B, T, D] the same for the prompt's text tokens after the image (with text_valid)",
    "vision_keys": "[C, T, d] the keys of one vision encoder layer, averaged over heads, of each crop's tokens (CLS "
    "included, marked not valid): what a strategy placed inside the vision tower (ToMe) matches at that layer",
    "vision_layer_attention": "[C, T] the CLS row of that layer's attention over each crop's current tokens, head mean",
    "vision_semantic": "[C, T] that layer's softmax over each crop's tokens of the CLS value · each value, head mean "
    "(FlowCut's semantic attention)",
    "vision_values": "[C, T, d] that layer's values of each crop's tokens, averaged over heads",
    "text_attention": "[B, T, N] attention of each prompt text token after the image to each visual token at the "
    "LLM layer where an in-LLM strategy prunes, averaged over heads (with text_valid; self-attention models)",
    "text_attention_max": "[B, T, N] the same, the maximum over heads",
    "visual_attention_max": "[B, N, N] attention of each visual token (row) to each visual token (causal) at that "
    "layer, the maximum over heads",
}


@dataclass
class Signals:
    """Inputs of a strategy for one batch. ``valid[b, i]`` is False for padding (never a candidate)."""

    valid: torch.Tensor  # [B, N] bool
    groups: torch.Tensor | None = None  # [B, N] long, -1 on padding
    cross_attention: torch.Tensor | None = None  # [B, H, N]
    last_token_attention: torch.Tensor | None = None  # [B, H, N]
    cls_attention: torch.Tensor | None = None  # [B, N]
    vision_attention: torch.Tensor | None = None  # [B, L, N]
    vision_cls_attention: torch.Tensor | None = None  # [B, L, N]
    features: torch.Tensor | None = None  # [B, N, D]
    text_embeds: torch.Tensor | None = None  # [B, T, D]
    text_valid: torch.Tensor | None = None  # [B, T] bool
    grid: torch.Tensor | None = None  # [B, N, 3] long
    hidden_states: torch.Tensor | None = None  # [B, N, D]
    text_hidden_states: torch.Tensor | None = None  # [B, T, D]
    text_attention: torch.Tensor | None = None  # [B, T, N]
    text_attention_max: torch.Tensor | None = None  # [B, T, N]
    visual_attention_max: torch.Tensor | None = None  # [B, N, N]
    vision_keys: torch.Tensor | None = None  # [C, T, d]
    vision_layer_attention: torch.Tensor | None = None  # [C, T]
    vision_semantic: torch.Tensor | None = None  # [C, T]
    vision_values: torch.Tensor | None = None  # [C, T, d]
    #: one seeded generator per sample (random strategies); seeded from the sample itself so that a
    #: sample's selection does not depend on which other samples share its batch
    generators: list[torch.Generator] | None = None
    #: context, not signals: the in-LLM stage being selected (0-based), each sample's visual tokens before any
    #: stage (None: ``num_valid``), and the plan's keep ratio (set by ``Strategy.selections``) — for strategies whose
    #: stages follow their own schedule (SparseVLM) rather than keep_ratio of what is left
    stage: int = 0
    num_visual: torch.Tensor | None = None  # [B] long
    keep_ratio: float | None = None
    #: vision strategies: the layers the adapter calls it at, and what it carried over from the last one for each
    #: current token (``Selection.carry``, gathered for the survivors; None at the first layer)
    stages: int | None = None
    carry: torch.Tensor | None = None  # [C, T]

    @property
    def num_valid(self) -> torch.Tensor:
        return self.valid.sum(dim=1)


@dataclass
class Selection:
    """One sample's result: visual tokens kept as they are, and merged tokens.

    A merged token takes the sequence slot (and so the position) of its ``anchor``, a visual token that is not in
    ``kept``; its vector is ``weights[m] @ vectors`` over the sample's visual tokens (row ``m`` sums to 1, zero on
    padding). ``kept`` and ``anchors`` are disjoint and sorted; together they are at most the budget.
    """

    kept: torch.Tensor  # [K] long
    anchors: torch.Tensor | None = None  # [M] long
    weights: torch.Tensor | None = None  # [M, N] float
    #: vision strategies: a state per token (over all N, by index) handed to the next layer's call (``Signals.carry``)
    carry: torch.Tensor | None = None  # [N]

    def __post_init__(self):
        self.kept = self.kept.sort().values
        if self.anchors is None:
            self.anchors = self.kept.new_zeros(0)
        order = self.anchors.argsort()
        self.anchors = self.anchors[order]
        if self.weights is not None:
            self.weights = self.weights[order]

    @property
    def num_merged(self) -> int:
        return len(self.anchors)

    @property
    def slots(self) -> torch.Tensor:
        """Every visual-token slot that stays in the sequence, kept or carrying a merge, sorted."""
        return torch.cat([self.kept, self.anchors.to(self.kept.device)]).sort().values


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
    #: where the strategy's signals exist on a self-attention model: "pre_llm" (before the language model), "in_llm"
    #: (inside it) or "vision" (inside the vision tower, layer by layer: ToMe). On cross-attention models (mllama)
    #: every strategy prunes at the cross-attention layers.
    stage: str = "pre_llm"
    #: defaults of the placement settings (``vtprune.placement``), e.g. fastv's ``{"layer": 2}``: the adapter owns
    #: where pruning happens, the strategy only proposes its authors' default
    placement: dict = field(default_factory=dict)
    #: the vectors a merged token averages: "features" (projector outputs), "vision" (the vision tower's output
    #: before the projector, then projected), or "input" (the image itself, downsampled, where the family's tower
    #: takes any resolution; "vision" on the others)
    merge_space: str = "features"
    #: the strategy's result may hold merged tokens (``Selection.anchors``): shown as its kind, checked by the tests
    merges: bool = False
    #: in-LLM strategies with their own stage counts (SparseVLM) and vision strategies (ToMe, a stage per vision
    #: layer): ``schedule(num_visual, keep_ratio, stages)`` → the tokens each stage keeps, what the adapter asks for
    #: and cost and kv figures assume; None: each stage keeps ceil(keep_ratio · n) of the n the last one kept
    schedule: Callable[[int, float, int], list[int]] | None = None
    #: in-LLM strategies that also select once before the LLM (VScan): called first with ``Signals.stage`` 0 and
    #: their pre-LLM signals (merges allowed there), then at each in-LLM stage (``stage`` 1, 2, ...)
    before_llm: bool = False
    #: whether a selection always holds exactly the budget (kept + merged), under given options: what vLLM needs, whose
    #: prompt holds one placeholder per token of the budget before the model runs. A bool, or a function of the
    #: options (PruMerge's adaptive mode keeps fewer)
    fills_budget: bool | Callable[[dict], bool] = True

    def fills(self, options: dict | None = None) -> bool:
        """``fills_budget`` under ``options`` (the defaults where absent)."""
        if callable(self.fills_budget):
            return self.fills_budget({name: opt.default for name, opt in self.options.items()} | (options or {}))
        return self.fills_budget

    @property
    def kind(self) -> str:
        """Where it acts and how, for listings and docs: "pre-LLM", "in-LLM", "in-LLM, multi-stage" or "vision"
        (inside the vision tower), plus ", merge" for a strategy that merges tokens."""
        kind = ("pre-LLM + " if self.before_llm else "") + {"pre_llm": "pre-LLM", "in_llm": "in-LLM",
                                                                "vision": "vision"}[self.stage]
        kind += ", multi-stage" if "layers" in self.placement else ""
        return kind + (", merge" if self.merges else "")

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def selections(self, signals: Signals, keep_ratio: float, counts: torch.Tensor | None = None,
                   **options) -> list[Selection]:
        """Each sample's ``Selection`` (kept indices, and merges if the strategy makes any): what adapters apply.
        ``counts``: the tokens each sample keeps where the adapter follows the strategy's ``schedule`` (a vision
        layer's); by default ``ceil(keep_ratio · valid)``."""
        opts = {name: opt.default for name, opt in self.options.items()} | options
        signals.keep_ratio = keep_ratio
        out = self.fn(signals, budgets(signals.num_valid, keep_ratio) if counts is None else counts, **opts)
        return [s if isinstance(s, Selection) else Selection(s) for s in out]

    def select(self, signals: Signals, keep_ratio: float, **options) -> list[torch.Tensor]:
        """Each sample's sorted kept indices (merges left out: for strategies that only keep)."""
        return [s.kept for s in self.selections(signals, keep_ratio, **options)]


STRATEGIES: Registry[Strategy] = Registry("strategy", "pruning.strategy")


def register_strategy(name: str, *, needs=(), options=None, stage="pre_llm", placement=None, merge_space="features",
                      merges=False, schedule=None, before_llm=False, fills_budget=True):
    unknown = [n for n in needs if n not in SIGNALS]
    if unknown:
        raise ValueError(f"strategy '{name}' needs unknown signal '{unknown[0]}' (known: {', '.join(SIGNALS)})")

    def wrap(fn):
        STRATEGIES.add(name, Strategy(name, fn, tuple(needs), dict(options or {}), stage, dict(placement or {}),
                                      merge_space, merges, schedule, before_llm, fills_budget))
        return fn

    return wrap


def sample_generators(seed: int, keys: list[bytes]) -> list[torch.Generator]:
    """One generator per sample, seeded by the config seed and a digest of the sample's own inputs."""
    import zlib

    return [torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key)) for key in keys]


def half_up(x: float) -> int:
    """``x`` rounded half up (Python's ``round`` goes half to even), after rounding off float noise."""
    return math.floor(round(x, 6) + 0.5)


def fraction_layer(fraction: float, layers: int) -> int:
    """The 1-based layer at ``fraction`` of ``layers`` (half up, within 1..layers): a strategy names a vision layer
    as a fraction of the depth, so that one default fits the 24-layer towers and the tiny ones."""
    return min(layers, max(1, half_up(fraction * layers)))


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
