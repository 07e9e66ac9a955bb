"""DART: keep the visual tokens least similar to a few pivot tokens (remove the pivots' duplicates).

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494. Followed: the authors' LLaVA code, ``get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py`` of github.com/ZichenWen1/DART (the original could not be
fetched here; read in its public fork xqy1111111/DART at the authors' last commit to that file, 9fee9fa), with the
defaults of their ``scripts/v1_5/eval/*.sh``: layer K = 2, 4 image pivots and 4 text pivots, largest L1 norm.

Their rule, per image: the image pivots are the ``pivot_image_token`` image tokens of largest L1 norm, the text
pivots the ``pivot_text_token`` prompt tokens after the image of largest L1 norm. Each pivot in turn takes the
image tokens (pivots excluded) least cosine-similar to it, each taken token removed from the candidates of the
next pivots. The image pivots and the taken tokens are kept; text pivots only steer the choice.

Deliberate differences:

- vectors: they rank norms on the key states (after RoPE, all heads concatenated) of the last layer that sees
  every token, and measure cosine on the hidden states entering layer K passed through the model's final
  RMSNorm; vtprune has neither the keys nor the norm's weights, so both use ``hidden_states`` (and
  ``text_hidden_states``) entering layer K as they are;
- budget: they keep the image pivots plus ``max_num_trunction // pivots`` tokens per pivot (132 for a budget of
  128); vtprune keeps exactly ``budget`` including the image pivots: ``budget − image pivots`` tokens split evenly
  over the pivots, the first pivots taking one more each for the remainder. A budget below the number of image
  pivots keeps the largest-norm tokens only;
- pivot order: theirs is a Python set's iteration order; vtprune takes image pivots then text pivots, each by
  decreasing norm (the order matters only for which pivot claims a shared token first);
- ties: equal norms or similarities go to the lower index (stable sorts); norms and cosines in float64;
- batching: they handle one sample; vtprune selects per sample, padding (visual or text) never a pivot or a
  candidate, and a sample without valid text tokens uses image pivots only;
- options: ``norm`` adds an L2 choice (their code uses L1 only, the default here).
"""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, register_strategy


def ranked_by_norm(vectors: torch.Tensor, valid: torch.Tensor, norm: str) -> torch.Tensor:
    """Indices of the valid rows of ``vectors`` [n, D] by decreasing L1 / L2 norm, ties to the lower index."""
    size = torch.linalg.vector_norm(vectors.double(), ord=1 if norm == "l1" else 2, dim=-1)
    order = torch.sort(size.masked_fill(~valid, float("-inf")), descending=True, stable=True).indices
    return order[: int(valid.sum())]


def dart_one(image, text, text_valid, k, pivot_image_token, pivot_text_token, norm):
    """Kept rows of one sample's valid image tokens ``image`` [n, D], given its text tokens ``text`` [T, D]."""
    n = len(image)
    image_pivots = ranked_by_norm(image, torch.ones(n, dtype=torch.bool, device=image.device), norm)
    image_pivots = image_pivots[: min(pivot_image_token, k)]
    text_pivots = ranked_by_norm(text, text_valid, norm)[:pivot_text_token]
    pivots = torch.cat([image[image_pivots], text[text_pivots]]).double()
    rest = k - len(image_pivots)
    if rest == 0:
        return image_pivots.sort().values
    similarity = F.normalize(pivots, dim=-1) @ F.normalize(image.double(), dim=-1).T  # [P, n]
    free = torch.ones(n, dtype=torch.bool, device=image.device)
    free[image_pivots] = False
    kept = [image_pivots]
    share, extra = divmod(rest, len(pivots))
    # every quota can be met: they add up to k − image pivots <= the free tokens
    for p in range(len(pivots)):
        quota = share + (p < extra)
        order = torch.sort(similarity[p].masked_fill(~free, float("inf")), stable=True).indices
        taken = order[:quota]
        free[taken] = False
        kept.append(taken)
    return torch.cat(kept).sort().values


@register_strategy(
    "dart",
    needs=("hidden_states", "text_hidden_states"),
    options={
        "pivot_image_token": Option(4, help="image pivots (largest norm), kept", bounds=(1, 64)),
        "pivot_text_token": Option(4, help="text pivots (largest norm among the prompt after the image)",
                                   bounds=(0, 64)),
        "norm": Option("l1", help="norm ranking the pivots", choices=("l1", "l2")),
    },
    stage="in_llm",
    placement={"layer": 2},
)
def keep_dart(signals, budgets, pivot_image_token=4, pivot_text_token=4, norm="l1"):
    """DART: keep pivot tokens (largest norm) and the tokens least cosine-similar to the pivots at layer K."""
    hidden = signals.hidden_states
    text = signals.text_hidden_states
    if text is None:  # no text signal: image pivots only
        text = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
    text_valid = signals.text_valid
    if text_valid is None:
        text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    kept = []
    for b, k in enumerate(budgets.tolist()):
        candidates = torch.nonzero(signals.valid[b]).flatten()
        rows = dart_one(hidden[b, candidates], text[b], text_valid[b], min(k, len(candidates)),
                        pivot_image_token, pivot_text_token, norm)
        kept.append(candidates[rows])
    return kept
