"""CDPruner: the visual tokens of maximal conditional diversity, by greedy MAP inference of a conditional DPP.

CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", arXiv 2506.10967). Rules followed from the authors' code, github.com/Theia-4869/CDPruner,
``llava/model/llava_arch.py`` (``encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py``:

- similarity ``S``: cosine similarity of the projector outputs;
- relevance ``r``: cosine similarity of each visual token to the instruction, averaged over the instruction
  embeddings, then min-max normalised as ``q = (r − min r + 1e-6) / (max r − min r)``;
- kernel ``L = diag(q) · S · diag(q)``; the kept tokens are the greedy MAP of the DPP with kernel ``L``, by the
  fast Cholesky-update greedy of Chen et al. (NeurIPS 2018, "Fast Greedy MAP Inference for Determinantal Point
  Process"), which the authors credit: the first pick is the most relevant token (``L_ii = q_i²``);
- default: ``q`` as above. The trade-off ``q ← exp(α · q)``, ``α = θ / (2(1 − θ))`` with ``θ = 0.5``, is
  left commented out in their code; here it is ``quality="exp"`` with option ``theta``.

Deliberate differences:

- relevance: vtprune has no CLIP text encoder. The authors compare CLIP's projected patch embeddings with CLIP's
  text embedding of the instruction; vtprune compares the projector outputs with the language model's input
  embeddings of the prompt's valid text tokens (as the adapter passes them; the authors encode the instruction
  alone), averaging the per-token cosines (their mean runs over the pooled embeddings of 77-token text segments,
  usually one);
- sign: the authors negate the cosine (``(-relevance).mean``), an observation about CLIP's intermediate patch
  embeddings; vtprune's stand-in space carries no such evidence, so it uses the cosine itself;
- normalisation per sample over its valid tokens (theirs spans the batch tensor: for one image that is the same,
  all crops of it together); when every token has the same relevance, or there is no text, ``q = 1`` (pure
  diversity) instead of a division by zero;
- multi-crop models: one DPP over the sample's whole packed sequence with one budget, row newlines candidates like
  any token; the authors run the DPP in each crop with the same count and then keep every newline;
- exactly ``budget`` tokens: once every remaining token's conditional gain vanishes (duplicates, or more tokens
  than the span of the features), their code divides by zero; vtprune restarts the greedy on the tokens not yet
  chosen. Float64 throughout; gains equal up to rounding (relative 1e-12) go to the lower index.
"""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, register_strategy

#: a token whose conditional gain falls below this share of its own ``L_ii`` lies in the span already chosen
_SPANNED = 1e-9
#: gains this close to the best one tie, so that rounding never beats the lower index
_TIE = 1e-12


def relevance(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Min-max normalised relevance ``q`` [n] of visual tokens [n, D] to text tokens [t, D], float64."""
    if len(text) == 0:
        return features.new_ones(len(features), dtype=torch.float64)
    cos = F.normalize(features.double(), dim=-1) @ F.normalize(text.double(), dim=-1).T
    r = cos.mean(dim=1)
    spread = r.max() - r.min()
    if spread <= 0:
        return torch.ones_like(r)
    return (r - r.min() + 1e-6) / spread


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of the DPP with PSD ``kernel`` [n, n]: ``k`` indices in the order chosen.

    Each step adds the token maximising ``det(L_{S+j})``, i.e. the largest conditional gain ``d_j²``, kept up to
    date by Chen et al.'s incremental Cholesky rows. When no remaining token adds volume, the greedy starts over
    on the tokens not chosen yet.
    """
    n = len(kernel)
    k = min(k, n)
    chosen: list[int] = []
    left = torch.arange(n, device=kernel.device)
    while len(chosen) < k:
        sub = kernel[left][:, left]
        picked = _greedy_round(sub, k - len(chosen))
        if not picked:  # zero diagonal left (zero vectors): no volume anywhere, index order
            picked = list(range(k - len(chosen)))
        chosen += left[picked].tolist()
        keep = torch.ones(len(left), dtype=torch.bool, device=kernel.device)
        keep[picked] = False
        left = left[keep]
    return torch.tensor(chosen, dtype=torch.long, device=kernel.device)


def _greedy_round(kernel: torch.Tensor, k: int) -> list[int]:
    """One run of the fast greedy, stopped at ``k`` picks or when the chosen set spans every token."""
    diag = kernel.diagonal().clone()
    gain = diag.clone()
    rows = kernel.new_zeros(k, len(kernel))  # Cholesky rows c_t of the chosen tokens, over all tokens
    open_ = diag > 0
    picked: list[int] = []
    while len(picked) < k and bool(open_.any()):
        candidates = gain.masked_fill(~open_, float("-inf"))
        best = candidates.max()
        j = int(torch.nonzero(candidates >= best * (1 - _TIE))[0])
        t = len(picked)
        e = (kernel[j] - rows[:t, j] @ rows[:t]) / best.sqrt()
        rows[t] = e
        gain = gain - e**2
        picked.append(j)
        open_[j] = False
        open_ &= gain > _SPANNED * diag
    return picked


@register_strategy(
    "cdpruner",
    needs=("features", "text_embeds"),
    options={
        "quality": Option(
            "linear",
            help="kernel quality: linear uses the normalised relevance q (the authors' default); exp uses "
            "exp(alpha * q), alpha = theta / (2 (1 - theta))",
            choices=("linear", "exp"),
        ),
        "theta": Option(
            0.5, help="relevance weight of quality=exp: 0 pure diversity, towards 1 relevance", bounds=(0.0, 0.99)
        ),
    },
)
def keep_cdpruner(signals, budgets, quality="linear", theta=0.5):
    """CDPruner: greedy MAP of a DPP whose kernel is feature similarity conditioned on instruction relevance."""
    if quality not in ("linear", "exp"):
        raise ValueError(f"cdpruner: quality must be linear or exp, got {quality!r}")
    if not 0 <= theta <= 0.99:
        raise ValueError(f"cdpruner: theta must be between 0 and 0.99, got {theta}")
    kept = []
    for b, k in enumerate(budgets.tolist()):
        candidates = torch.nonzero(signals.valid[b]).flatten()
        features = signals.features[b, candidates]
        text = signals.text_embeds[b]
        if signals.text_valid is not None:
            text = text[signals.text_valid[b]]
        q = relevance(features, text)
        if quality == "exp":
            q = torch.exp(theta / (2 * (1 - theta)) * q)
        unit = F.normalize(features.double(), dim=-1)
        similarity = unit @ unit.T
        similarity = (similarity + similarity.T) / 2  # exactly symmetric, so mirrored gains tie exactly
        kernel = q[:, None] * similarity * q[None, :]
        kept.append(candidates[greedy_map(kernel, k)])
    return kept
