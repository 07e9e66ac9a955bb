"""VScan: global and local scans with merging before the LLM, then middle-layer pruning inside it.

VScan (Zhang, Ma, Fang, Yu, Zhang, Zhang, Xie, Sycara, Mi and Yu, TMLR 2026, "VScan: Rethinking Visual Token
Reduction for Efficient Large Vision-Language Models", arXiv 2505.22654). Rules read (not copied) from the authors'
code, github.com/Tencent/SelfEvolvingAgent, ``VScan/llava/model/llava_arch.py`` (``LlavaMetaForCausalLM
.encode_images``, ``window_cls_selection``, ``token_merging``), ``VScan/llava/model/multimodal_encoder/
clip_encoder.py`` (``CLIPVisionTower.feature_select``: the CLS row of every layer's attention, head mean),
``VScan/llava/model/modeling_llama_x.py`` (``LlamaModel.forward_x``, ``layer_prune``), defaults from
``VScan/README.md`` (96 tokens before the LLM, 32 from layer 16 of 32: 64 on average).

The rule as implemented. Stage 0, before the LLM, keeps ``n0`` tokens:

- local scan: ``m = int(n0 · local_ratio)`` tokens (``local_ratio`` 0.5) by the CLS attention of a shallow vision
  layer, window by window: each crop's patch grid is cut into non-overlapping windows, ``windows`` per side (4: the
  authors' 6 × 6 windows of CLIP-L's 24 × 24 grid), and the windows give their best tokens in turn (below);
- global scan: the other ``n0 − m`` by the CLS attention of the deep layer (the one the projector reads, layer
  ``L``; their layer 23 of 24), the local tokens excluded;
- merging: every other patch token is assigned to the retained token (local or global) of the largest cosine
  similarity of projector outputs — theirs too: they merge after ``mm_projector`` — and each retained token that
  gets any becomes the uniform mean of itself and its assigned tokens (their ``scaling`` 1: ``(r + Σ a) / (1 + c)``).
  A merged token keeps its retained token's slot, as theirs does; a retained token with nothing assigned is kept.

Each in-LLM stage (default one, at half the depth: their layer 16 of 32) keeps the tokens the last prompt token
attends to most, averaged over heads (``last_token_attention``, as ``fastv`` and ``pdrop``). No merges there.

Deliberate differences:

- counts: for ``B = budget(N, keep_ratio)`` (``N`` the sample's visual tokens before any stage) stage 0 keeps
  ``n0 = min(N, ceil(1.5 · B))`` (kept and merged) and the first in-LLM stage ``ceil(0.5 · B)``, at most ``n0``:
  their 96 then 32 at ``B`` = 64 (64 on average over 32 layers when the stage sits at half the depth). Each further
  in-LLM stage keeps ``ceil(n / 3)`` of the ``n`` left (their 96 → 32 is a third), at least 1.
  ``keep_ratio >= 1`` prunes and merges nothing. The authors take fixed counts (``visual_token_num``,
  ``image_token_list``), per crop before the LLM;
- layers: the shallow layer is the option ``shallow_layer``, a fraction of ``L``:
  ``clamp(round_half_up(shallow_layer · L), 1, L)``; the default 6 / 23 gives their layer 6 on LLaVA (``L`` = 23);
- windows: each crop's windows are cells of the same size, per axis ``ceil(extent / windows)``, the extent being
  the largest row (column) + 1 over the sample's crops, so LLaVA-NeXT's unpadded crops keep the windows of their
  full grid and have partial ones at the cut; the authors assert a 24 × 24 grid. The local tokens are taken round
  by round: every window's best token, then every window's second best, and so on, so each of the ``w``
  non-empty windows of the sample gives ``m // w`` and the remainder goes to the windows whose next best token has
  the highest attention; a window with fewer tokens gives them all and the shortfall is filled in the same way.
  The authors take ``k = m // windows²`` per window and never fill the remainder, so they keep fewer than ``n0``
  tokens when ``windows²`` does not divide ``m`` (no local token at all when ``m`` < 16);
- multi-crop models: one ranking, one ``n0`` and one set of windows over the sample's whole packed sequence, where
  the authors scan each crop with the same ``visual_token_num``. Tokens without a patch (LLaVA-NeXT's row
  newlines, grid -1) are never local, may be global (their CLS attention is 0, so only when the patches run out),
  and are neither merged nor merge targets: kept as they are when retained, dropped when not; the authors keep
  every newline, outside the count;
- similarity in float64 on ``features`` (the vectors merged, as theirs); a token equally similar to two retained
  tokens goes to the lower one, as their ``argmax``;
- in-LLM scores: vtprune's ``last_token_attention`` at the placement layer (computed as for ``fastv``), where the
  authors recompute it with the q / k of the first pruned layer; positions are the adapter's, as for ``pdrop``
  (kept tokens keep their rotary positions), where the authors renumber the shortened sequence;
- ties → the lower index (stable sorts), theirs ``torch.topk``; each sample separately over its valid tokens
  (padding is never ranked, retained or merged), theirs batch 1.
"""

import math

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, Selection, budget, fraction_layer, register_strategy, topk_valid

#: stage 0 and the first in-LLM stage keep these shares of the budget (the authors' 96 and 32 of 64)
BEFORE_LLM = 1.5
FIRST_IN_LLM = 0.5
#: each later in-LLM stage keeps this share of the one before (96 → 32)
LATER_IN_LLM = 1 / 3


def ceil_rounded(x: float) -> int:
    # rounded first so that 1.5 · 64 lands on 96, not a hair above it
    return math.ceil(round(x, 6))


def schedule(num_visual: int, keep_ratio: float, stages: int) -> list[int]:
    """``[n0, n1, ..., n_stages]``: tokens left before the LLM (stage 0) and after each of ``stages`` in-LLM stages."""
    if keep_ratio >= 1:
        return [num_visual] * (stages + 1)
    b = budget(num_visual, keep_ratio)
    counts = [min(num_visual, ceil_rounded(BEFORE_LLM * b))]
    for stage in range(stages):
        share = FIRST_IN_LLM * b if stage == 0 else LATER_IN_LLM * counts[-1]
        counts.append(min(counts[-1], max(1, ceil_rounded(share))))
    return counts


def window_ids(grid: torch.Tensor, windows: int) -> torch.Tensor:
    """[P] window id (0-based, dense) of each row of ``grid`` [P, 3] (patch tokens only), per crop."""
    wh = -(-(int(grid[:, 1].max()) + 1) // windows)
    ww = -(-(int(grid[:, 2].max()) + 1) // windows)
    cell = (grid[:, 0] * windows + grid[:, 1] // wh) * windows + grid[:, 2] // ww
    return torch.unique(cell, return_inverse=True)[1]


def local_scan(attention: torch.Tensor, window: torch.Tensor, m: int) -> torch.Tensor:
    """Positions (into ``attention`` [P]) of ``m`` tokens taken round by round over ``window`` [P] (ids)."""
    order = torch.sort(attention, descending=True, stable=True).indices  # ties: the lower position first
    w = window[order]
    by_window = torch.sort(w, stable=True).indices  # each window's tokens together, best first
    sizes = torch.bincount(w)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(w)
    rank[by_window] = torch.arange(len(w), device=w.device) - starts[w[by_window]]
    # a stable sort by rank keeps the attention order among the tokens of one round
    return order[torch.sort(rank, stable=True).indices[:m]]


def before_llm(signals, b: int, n0: int, local_ratio: float, shallow: int, windows: int) -> Selection:
    valid, grid = signals.valid[b], signals.grid[b]
    n = int(valid.sum())
    if n0 >= n:
        return Selection(valid.nonzero().squeeze(1))
    attention = signals.vision_cls_attention[b].float()
    patch = valid & (grid[:, 0] >= 0)
    retained = torch.zeros_like(valid)
    patches = patch.nonzero().squeeze(1)
    if len(patches):
        m = int(round(n0 * local_ratio, 6))
        local = local_scan(attention[shallow - 1, patches], window_ids(grid[patches], windows), m)
        retained[patches[local]] = True
    retained[topk_valid(attention[-1], valid & ~retained, n0 - int(retained.sum()))] = True

    targets = (retained & patch).nonzero().squeeze(1)
    sources = (patch & ~retained).nonzero().squeeze(1)
    if not len(sources) or not len(targets):
        return Selection(retained.nonzero().squeeze(1))
    unit = F.normalize(signals.features[b].double(), dim=-1)
    nearest = (unit[sources] @ unit[targets].T).argmax(dim=1)  # the first maximum: the lower retained token
    assigned = torch.bincount(nearest, minlength=len(targets))
    merged = assigned > 0
    row = torch.cumsum(merged, 0) - 1
    weights = torch.zeros(int(merged.sum()), valid.shape[0], device=valid.device)
    share = 1.0 / (1 + assigned.float())
    weights[row[merged], targets[merged]] = share[merged]
    weights[row[nearest], sources] = share[nearest]
    kept = torch.cat([targets[~merged], (retained & ~patch).nonzero().squeeze(1)])
    return Selection(kept, targets[merged], weights)


@register_strategy(
    "vscan",
    needs=("vision_cls_attention", "features", "grid", "last_token_attention"),
    stage="in_llm",
    before_llm=True,
    merges=True,
    placement={"layers": (0.5,)},
    schedule=schedule,
    options={
        "local_ratio": Option(
            0.5, help="share of the tokens kept before the LLM taken by the local (windowed) scan", bounds=(0.0, 1.0)
        ),
        "shallow_layer": Option(
            6 / 23,
            help="the local scan's vision layer as a fraction of the layers up to the one the projector reads: "
            "layer clamp(round(shallow_layer · L), 1, L)",
            bounds=(0.0, 1.0),
        ),
        "windows": Option(4, help="local-scan windows per side of each crop's patch grid", bounds=(1, 64)),
    },
)
def keep_vscan(signals, budgets, local_ratio=0.5, shallow_layer=6 / 23, windows=4):
    """VScan: global + windowed local CLS-attention scans and merging before the LLM, last-token pruning inside it.

    Follows its own ``schedule`` from ``signals.keep_ratio``, ``num_visual`` and ``stage``, not ``budgets``.
    """
    if not 0 <= local_ratio <= 1:
        raise ValueError(f"vscan: local_ratio must be between 0 and 1, got {local_ratio}")
    if not 0 <= shallow_layer <= 1:
        raise ValueError(f"vscan: shallow_layer must be between 0 and 1, got {shallow_layer}")
    if not 1 <= windows <= 64:
        raise ValueError(f"vscan: windows must be between 1 and 64, got {windows}")
    if signals.keep_ratio is None:
        raise ValueError("vscan: signals.keep_ratio is not set (Strategy.selections sets it)")
    num_visual = signals.num_visual if signals.num_visual is not None else signals.num_valid
    out = []
    for b in range(signals.valid.shape[0]):
        count = schedule(int(num_visual[b]), signals.keep_ratio, signals.stage)[signals.stage]
        if signals.stage == 0:
            shallow = fraction_layer(shallow_layer, signals.vision_cls_attention.shape[1])
            out.append(before_llm(signals, b, count, local_ratio, shallow, windows))
        else:
            scores = signals.last_token_attention[b].float().mean(dim=0)
            out.append(topk_valid(scores, signals.valid[b], count))
    return out
