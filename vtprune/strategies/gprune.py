"""G-Prune: keep the tokens that collect the most information flow over a cosine-similarity graph.

G-Prune (Jiang, Wu, Lin, Yu, Zhou, AAAI 2025, "What Kind of Visual Tokens Do We Need? Training-free Visual Token
Pruning for Multi-modal Large Language Models from the Perspective of Graph", arXiv 2501.02268). Rule read from the
authors' code (read for the rule, not copied), github.com/jytmelon/G-Prune,
``LLaVA-NeXT/llava/model/llava_arch.py`` (``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``), with the
defaults set there (``similarity = 0.5``, ``temperature = 0.03``, ``iterate_num = 5``):

- nodes: the visual tokens, their vectors ``x_i`` the projector outputs (``features``, as in the authors' code);
- edges: ``i — j`` when ``cos(x_i, x_j) >= similarity`` (every token links to itself);
- links: each row is a softmax of ``cos / temperature`` over the row's edges, ``P`` (row-stochastic);
- flow: every token starts with its L2 norm ``w_i = |x_i|`` and passes it along ``P`` ``iterations`` times;
- score: ``s_j = (wᵀ Pᵗ)_j / deg_j``, ``deg_j`` the number of edges of ``j`` (itself included);
  the ``B`` highest scores are kept.

Deliberate differences:

- multi-view models (LLaVA-NeXT): one graph and one budget over the sample's whole packed sequence, newline tokens
  included as ordinary candidates. The authors build two graphs, the 576-token base view and the stitched,
  unpadded high-resolution grid without its newlines, keep ``int(keep_ratio · n)`` of each, and always keep every
  row newline. vtprune's budget is one per sample over all its visual tokens, newlines counted, and a strategy
  names no model family; on a single view (LLaVA-1.5) the rule is their per-graph rule;
- budget: ``ceil(keep_ratio · valid tokens)``, where they floor per graph;
- arithmetic: float64 throughout (they run in the model's float16), and the cosine matrix made exactly symmetric,
  so the threshold cuts both directions of a link alike and equal scores are real ties; ties → the lower index
  (stable sort; ``torch.topk`` does not say);
- degree: the edge count. They count the positive softmax weights, which in float16 loses edges whose weight
  underflows (at their defaults the weakest edge weighs ``e^-16.7`` of the self-link, about float16's smallest
  subnormal);
- edges: they zero the similarities below the threshold, then treat every entry with ``|cos / T| < 1e-6`` as no
  edge; vtprune links ``cos >= similarity`` with ``cos > 0`` (the same unless ``similarity < 1e-6 · T``), plus an
  explicit self-link, which a threshold of 1 could otherwise lose to rounding. A zero vector (no edge at all in
  their code, whose row then spreads uniformly) has only its self-link here: it receives no flow either way and
  scores 0;
- batching and padding: each sample separately over its valid tokens only (their code handles one image);
  padding is never a node.
"""

import torch
import torch.nn.functional as F

from vtprune.strategies.base import Option, register_strategy


def flow_scores(features: torch.Tensor, similarity: float, temperature: float, iterations: int) -> torch.Tensor:
    """G-Prune score of each row of ``features`` [n, D]: flow received after ``iterations`` steps / degree."""
    x = features.double()
    unit = F.normalize(x, dim=-1)
    cos = unit @ unit.T
    cos = (cos + cos.T) / 2
    edge = ((cos >= similarity) & (cos > 0)) | torch.eye(len(x), dtype=torch.bool, device=x.device)
    links = torch.softmax((cos / temperature).masked_fill(~edge, float("-inf")), dim=1)
    degree = edge.sum(dim=1)
    received = x.norm(dim=-1) @ torch.linalg.matrix_power(links, iterations)
    return received / degree


@register_strategy(
    "gprune",
    needs=("features",),
    options={
        "similarity": Option(0.5, help="cosine similarity at or above which two tokens are linked", bounds=(0.0, 1.0)),
        "temperature": Option(0.03, help="softmax temperature of the link weights", bounds=(0.01, 10.0)),
        "iterations": Option(5, help="propagation steps of the information flow", bounds=(0, 64)),
    },
)
def keep_gprune(signals, budgets, similarity=0.5, temperature=0.03, iterations=5):
    """G-Prune: information flow from each token's norm over a thresholded cosine graph, top scores per degree."""
    if not 0 <= similarity <= 1:
        raise ValueError(f"gprune: similarity must be between 0 and 1, got {similarity}")
    if not 0.01 <= temperature <= 10:
        raise ValueError(f"gprune: temperature must be between 0.01 and 10, got {temperature}")
    if not 0 <= iterations <= 64:
        raise ValueError(f"gprune: iterations must be between 0 and 64, got {iterations}")
    kept = []
    for b, k in enumerate(budgets.tolist()):
        nodes = torch.nonzero(signals.valid[b]).flatten()
        scores = flow_scores(signals.features[b, nodes], similarity, temperature, iterations)
        order = torch.sort(scores, descending=True, stable=True).indices
        kept.append(nodes[order[:k]])
    return kept
