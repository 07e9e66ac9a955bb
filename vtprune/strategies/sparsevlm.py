"""SparseVLM: text-guided visual-token pruning at three LLM layers, with the pruned tokens partly recycled.

SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", arXiv 2410.04417). Rules followed from the authors' code (v1, main branch), github.com/Gumpest/SparseVLMs:
``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``: the text raters and
the sparse-layer loop), ``score.py`` (``attn_postprocess_topk``, the count tables, ``layer_dict``) and ``utils.py``
(``cluster_and_merge``, DPC-KNN); read for the rule, not copied. The SparseVLM+ (``V2_0``) paths are not followed.

The rule as implemented, at each in-LLM stage (by default after layers 3, 7, 16 of 32: the authors prune the
output of their 0-based layers 2, 6, 15):

- raters: ``m = mean over visual tokens of softmax over text of (v · tᵀ)`` on the hidden states; the raters are
  the text tokens with ``m`` above its mean (every text token when none is, e.g. all equal);
- score of a visual token: its head-mean attention from the raters, averaged over the raters (``text_attention``);
- count: ``B = budget(num_visual, keep_ratio)``; stage ``s`` leaves ``n_s = min(n, max(1, ceil(m_s · B)))`` of the
  ``n`` tokens present, ``m = (300, 200, 110) / 192`` (the last one for any later stage). That is the authors'
  table for 192 of 576 tokens (300, 200, 110), reproduced exactly at keep 1/3 of 576; their tables for 64, 96 and
  128 tokens have other shapes and are not used (one shape at every ratio). ``keep_ratio >= 1`` prunes nothing;
- recycling: of the ``d`` deleted tokens, the top ``int(0.3 · d) + 1`` by score are clustered into
  ``int(that / 10) + 1`` clusters by DPC-KNN on their hidden states (distance: Euclidean / sqrt(D); density:
  ``exp(-mean squared distance to the c nearest, self included)``; indicator: the distance to the nearest denser
  token, the largest distance of all for the densest; centres: top ``c`` by indicator · density; every token joins
  its nearest centre). Each cluster becomes one token, the uniform mean of its members; the other deleted tokens
  are dropped.

Deliberate differences:

- raters are picked at every stage from that stage's hidden states (the visual tokens still present and the text
  after the image); the authors pick them once, from the LLM's input embeddings;
- the merged tokens count in ``n_s``: ``kept + clusters = n_s``, with ``kept`` the largest count whose ``n − kept``
  deleted tokens give few enough clusters (``kept + clusters(n − kept) <= n_s``; the sum can always be made equal
  to ``n_s``). At least one token is kept as it is, so ``n_s = 1`` keeps the top token and recycles nothing, and
  when ``n_s − 1`` slots cannot hold all the clusters there are ``n_s − 1``. The authors keep ``n_s`` and add the
  clusters on top;
- when ``n_s >= n`` every token stays and nothing is merged; the authors keep at most ``n − 1`` (their ``topk`` of
  ``min(count, v_token_num − 1)``), so they always drop one;
- a merged token takes the slot (and position) of its cluster's centre; the authors append the clusters after
  the kept visual tokens and renumber the positions of the shortened sequence;
- a one-member cluster is kept as a plain token, not written as a merge; the merge is the exact mean (the
  authors divide by ``size + 1e-6``);
- ties are deterministic, to the lower index, instead of the authors' ``U(0, 1e-6)`` noise on the density and
  ``torch.topk``'s order: equal densities count the lower index as denser, equal scores and equal centre scores
  go to the lower index, a token equally near two centres joins the lower one. Clustering runs in float64;
- batching and padding: each sample separately over its valid visual and text tokens (the authors run batch 1);
  on multi-crop models one ranking and one count over the sample's packed sequence, ``num_visual`` counting every
  crop's tokens.
"""

import math

import torch

from vtprune.strategies.base import Selection, budget, register_strategy

#: tokens left after each stage for 192 of 576 (the authors' ``sparse_token_list_192``), scaled to any budget
SCHEDULE = (300, 200, 110)
REFERENCE = 192
#: share of the deleted tokens recycled, and recycled tokens per cluster (the authors' constants)
RECYCLED_SHARE = 0.3
PER_CLUSTER = 10


def stage_count(current: int, num_visual: int, keep_ratio: float, stage: int) -> int:
    """``n_s``: visual tokens (kept and merged) left by stage ``stage`` of ``current`` present."""
    if keep_ratio >= 1:
        return current
    tokens = SCHEDULE[min(stage, len(SCHEDULE) - 1)]
    # integer ceil: 200 / 192 · 192 in floating point is a hair above 200
    return min(current, max(1, -(-tokens * budget(num_visual, keep_ratio) // REFERENCE)))


def recycling(deleted: int) -> tuple[int, int]:
    """``(recycled, clusters)`` for ``deleted`` pruned tokens; ``deleted * 0.3`` in floating point as the authors."""
    recycled = int(deleted * RECYCLED_SHARE) + 1
    return recycled, recycled // PER_CLUSTER + 1


def split(current: int, count: int) -> tuple[int, int, int]:
    """``(kept, recycled, clusters)`` filling ``count < current`` slots: kept + clusters = count when possible."""
    kept = count - 1
    # kept + clusters(current - kept) never decreases with kept, so the first fit from the top is the largest
    while kept > 1 and kept + recycling(current - kept)[1] > count:
        kept -= 1
    kept = max(kept, 1)
    recycled, clusters = recycling(current - kept)
    return kept, recycled, min(clusters, count - kept)


def raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[T] bool: the text tokens (rows of ``text``) the visual tokens (rows of ``visual``) relate to above average."""
    relevance = (visual @ text.T).softmax(dim=1).mean(dim=0)
    above = relevance > relevance.mean()
    return above if above.any() else torch.ones_like(above)


def dpc_knn(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN of the rows of ``x``: sorted centre rows, and for each row the position in them of its centre."""
    n = x.shape[0]
    # the direct (not matmul) distance: identical rows are exactly 0 apart, and no [n, n, D] difference tensor
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])
    nearest = dist.sort(dim=1).values[:, :clusters]
    density = torch.exp(-(nearest**2).mean(dim=1))
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j < i
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & lower)
    indicator = dist.masked_fill(~denser, float("inf")).min(dim=1).values
    indicator = torch.where(denser.any(dim=1), indicator, dist.max())
    score = indicator * density
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters].sort().values
    assignment = dist[:, centres].argmin(dim=1)  # first minimum: the lower centre
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def scores(signals, b: int) -> torch.Tensor:
    """[N] float64: sample ``b``'s visual tokens' attention from its raters (zero when it has no text)."""
    valid = signals.valid[b]
    text_valid = signals.text_valid[b] if signals.text_valid is not None else None
    text = signals.text_hidden_states[b]
    attention = signals.text_attention[b]
    if text_valid is not None:
        text, attention = text[text_valid], attention[text_valid]
    if text.shape[0] == 0:
        return torch.zeros(valid.shape[0], dtype=torch.float64, device=valid.device)
    chosen = raters(signals.hidden_states[b][valid].double(), text.double())
    return attention[chosen].double().mean(dim=0)


def schedule(num_visual: int, keep_ratio: float, stages: int) -> list[int]:
    """The visual tokens left after each of ``stages`` stages (what cost and kv figures assume)."""
    counts = [num_visual]
    for stage in range(stages):
        counts.append(stage_count(counts[-1], num_visual, keep_ratio, stage))
    return counts[1:]


@register_strategy(
    "sparsevlm",
    needs=("text_attention", "hidden_states", "text_hidden_states"),
    stage="in_llm",
    schedule=schedule,
    placement={"layers": (3 / 32, 7 / 32, 16 / 32)},
    merges=True,
)
def keep_sparsevlm(signals, budgets):
    """SparseVLM: at three LLM layers keep the tokens text raters attend to most; cluster and merge part of the rest.

    Follows its own count schedule from ``signals.keep_ratio``, ``num_visual`` and ``stage``, not ``budgets``.
    """
    if signals.keep_ratio is None:
        raise ValueError("sparsevlm: signals.keep_ratio is not set (Strategy.selections sets it)")
    num_visual = signals.num_visual if signals.num_visual is not None else signals.num_valid
    out = []
    for b in range(signals.valid.shape[0]):
        valid = signals.valid[b]
        present = valid.nonzero().squeeze(1)
        score = scores(signals, b)
        order = present[torch.sort(score[present], descending=True, stable=True).indices]
        count = stage_count(len(present), int(num_visual[b]), signals.keep_ratio, signals.stage)
        if count >= len(present):
            out.append(Selection(order))
            continue
        n_kept, n_recycled, n_clusters = split(len(present), count)
        kept, merged = order[:n_kept].tolist(), []
        if n_clusters:
            pool = order[n_kept : n_kept + n_recycled].sort().values
            centres, assignment = dpc_knn(signals.hidden_states[b, pool].double(), n_clusters)
            for c, centre in enumerate(pool[centres].tolist()):
                members = pool[assignment == c].tolist()
                if len(members) == 1:
                    kept.append(centre)
                else:
                    merged.append((centre, members))
        weights = torch.zeros(len(merged), valid.shape[0], device=valid.device)
        for row, (_, members) in enumerate(merged):
            weights[row, members] = 1.0 / len(members)
        out.append(
            Selection(
                torch.tensor(kept, dtype=torch.long, device=valid.device),
                torch.tensor([centre for centre, _ in merged], dtype=torch.long, device=valid.device),
                weights,
            )
        )
    return out
