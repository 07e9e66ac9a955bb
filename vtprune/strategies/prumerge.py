"""PruMerge: CLS-attention outliers kept, each merged with its nearest neighbours weighted by CLS attention.

LLaVA-PruMerge (Shang, Cai, Xu, Lee, Yan, ICCV 2025, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388). Rules read (not copied) from the authors' code, github.com/42Shawn/
LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py`` (``outlier_dectection``,
``CLIPVisionTower.token_prune_merge_advanced``):

- selection: the tokens whose CLS→patch attention is above ``Q3 + 1.5 · (Q3 − Q1)`` (quartiles linearly
  interpolated, as ``np.percentile``): the IQR outliers, i.e. the top ``m`` tokens by attention, ``m`` adaptive;
- merge: each selected token ``i`` takes its ``neighbours`` (32) most similar other tokens by cosine similarity
  (selected or not) and becomes ``x_i + Σ_j a_j · x_j``, ``a_j`` being neighbour ``j``'s CLS attention;
- one extra token, ``Σ_j a_j · x_j`` over every unselected token, is added after the selected ones;
- the merged vectors are the vision tower's outputs before the projector (``merge_space="vision"``).

Budget (option ``mode``): ``"budget"`` (default) fills exactly ``min(B, valid)`` slots, ``B`` vtprune's budget:
the extra token and ``B − 1`` selected tokens, the top ones by CLS attention (the IQR outliers come first in that
order, so their count does not matter here). ``"adaptive"`` is the authors' count: the ``max(1, m)`` outliers and
the extra token, at most ``B`` slots (an upper bound; over it the lowest-attention outliers give way). At budget 1
there is no extra token, nor where no CLS attention is left outside the selection (in ``"budget"`` mode its slot
then selects one more token). In ``"budget"`` mode a budget with room for every valid token (keep 1.0) keeps
them all as they are: vtprune's keep 1.0 is the unpruned model (the authors' rule would still merge every selected
token with its neighbours); ``"adaptive"`` at keep 1.0 is the authors' rule itself, the budget no bound.

Deliberate differences:

- scores: vtprune's ``cls_attention`` (the head-averaged CLS row of the vision layer producing the features); the
  authors take one whole-width (single-head) softmax of the q·k projections of the tower's last layer (layer 23
  of CLIP ViT-L/14-336), whose input those features are. Similarity: cosine on ``features`` (projector outputs), not that layer's keys, which vtprune does
  not expose; float64, so exact ties are real ties;
- merge weights: a merged token's row is ``1`` on itself and ``a_j`` on its neighbours, divided by ``1 + Σ a_j`` so
  it sums to 1 (theirs is not normalised: the token's norm grows by its neighbours' share); the extra token's row
  is ``a_j / Σ a_j`` (theirs sums to ``Σ a_j``). The weights assume ``cls_attention`` is a softmax probability, as
  theirs; a selected token whose neighbours carry no attention, and one with zero attention itself (a LLaVA-NeXT
  newline: no vision vector behind it), is kept as it is;
- placement: every token stays in its own slot, the extra token in the slot of the unselected token with the most
  attention (kept as it is if it is the only one with any); the authors order the selected tokens by attention
  and append the extra token last. The extra token counts in the budget and is an option (``extra_token``);
- edges: at least one token is selected (with no outlier they select none); ``neighbours`` is capped at the other
  valid tokens (their ``topk`` needs 33 tokens); ties → the lower index (stable sorts), where ``torch.topk`` leaves
  them unspecified;
- batching and padding: quartiles and ranking per sample over its valid tokens (theirs pool the batch, run at batch
  1); on multi-crop models one ranking and one budget over the sample's whole packed sequence, its zero-attention
  newline tokens counting in the quartiles.
"""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, Selection, register_strategy

#: neighbours merged into each selected token (the authors' constant)
NEIGHBOURS = 32
MODES = ("budget", "adaptive")


def options(variant: str) -> dict[str, Option]:
    return {
        "mode": Option("budget", help=f"'budget': exactly the budget; 'adaptive': {variant}'s own count, at most "
                       "the budget", choices=MODES),
        "neighbours": Option(NEIGHBOURS, help="most similar tokens merged into each selected token",
                             bounds=(0, 4096)),
        "extra_token": Option(True, help="one more token: the CLS-attention-weighted mean of the unselected tokens "
                              "(takes a slot of the budget)"),
    }


def check(name: str, mode: str, neighbours: int) -> None:
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if neighbours < 0:
        raise ValueError(f"{name}: neighbours must be zero or more, got {neighbours}")


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many ``scores`` (1-D) lie strictly above ``Q3 + 1.5 · IQR``: they are the top ones by score."""
    scores = scores.double()
    if not len(scores):
        return 0
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device))
    return int((scores > q3 + 1.5 * (q3 - q1)).sum())


def merged(attention, unit, pick, slots: int, neighbours: int, extra_token: bool, index, width: int) -> Selection:
    """One sample's ``Selection``: ``pick(k)`` gives at most ``k`` selected tokens (local indices into the valid
    tokens, whose CLS ``attention`` [n] and unit features ``unit`` [n, D] are given; ``index`` maps them back);
    ``slots`` holds the selection and, where possible, the extra token."""
    n = len(attention)
    rest = None
    if extra_token and slots >= 2:
        chosen = pick(slots - 1)
        rest = torch.ones(n, dtype=torch.bool, device=attention.device)
        rest[chosen] = False
        rest = torch.where(rest, attention, 0)
        if not rest.sum() > 0:  # the extra token would average nothing: its slot goes back to the selection
            rest = None
    if rest is None:
        chosen = pick(slots)

    rows = torch.arange(len(chosen), device=unit.device)
    near = unit[chosen] @ unit.T
    near[rows, chosen] = float("-inf")  # a token is not its own neighbour
    near = torch.sort(near, dim=1, descending=True, stable=True).indices[:, : min(neighbours, n - 1)]
    weights = torch.zeros(len(chosen), n, dtype=attention.dtype, device=attention.device)
    weights.scatter_(1, near, attention[near])
    merges = (weights.sum(dim=1) > 0) & (attention[chosen] > 0)
    weights[rows, chosen] = 1.0
    weights = weights[merges] / weights[merges].sum(dim=1, keepdim=True)
    kept, anchors = chosen[~merges], chosen[merges]

    if rest is not None:
        top = rest.argmax()  # the first maximum: ties → the lower index
        if int((rest > 0).sum()) == 1:
            kept = torch.cat([kept, top[None]])
        else:
            anchors = torch.cat([anchors, top[None]])
            weights = torch.cat([weights, (rest / rest.sum())[None]])
    full = torch.zeros(len(anchors), width, device=index.device)
    full[:, index] = weights.float()
    return Selection(index[kept], index[anchors], full)


def sample_inputs(signals, b: int):
    """``(index, attention, unit)``: sample ``b``'s valid token indices, their CLS attention (float64) and their
    unit-normalised features (float64)."""
    index = torch.nonzero(signals.valid[b]).flatten()
    return index, signals.cls_attention[b, index].double(), F.normalize(signals.features[b, index].double(), dim=-1)


@register_strategy("prumerge", needs=("cls_attention", "features"), options=options("PruMerge"),
                   merge_space="vision", merges=True, fills_budget=lambda options: options["mode"] == "budget")
def keep_prumerge(signals, budgets, mode="budget", neighbours=NEIGHBOURS, extra_token=True):
    """PruMerge: CLS-attention outliers (IQR), each merged with its nearest tokens weighted by CLS attention."""
    check("prumerge", mode, neighbours)
    out = []
    for b, k in enumerate(budgets.tolist()):
        index, attention, unit = sample_inputs(signals, b)
        order = torch.sort(attention, descending=True, stable=True).indices
        n = len(order)
        if mode == "budget" and k >= n:  # room for every token: nothing pruned, nothing merged (keep 1.0 ≡ unpruned)
            out.append(Selection(index, index.new_zeros(0), torch.zeros(0, signals.valid.shape[1])))
            continue
        if mode == "adaptive":
            count = max(1, iqr_outliers(attention))
            slots = min(count + int(extra_token), k, n)
            pick = lambda c, order=order, count=count: order[: min(c, count)]
        else:
            slots = min(k, n)
            pick = lambda c, order=order: order[:c]
        out.append(merged(attention, unit, pick, slots, neighbours, extra_token, index, signals.valid.shape[1]))
    return out
