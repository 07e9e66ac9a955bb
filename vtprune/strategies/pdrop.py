"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", arXiv 2410.17247): visual tokens dropped in several stages inside the LLM.

At the start of each stage the last instruction token's attention to the remaining image tokens (head mean) ranks
them, and the stage keeps the top ``keep_ratio`` of what the previous stage kept — the paper's λ: with λ = 0.5 at
layers 8, 16, 24 of LLaVA-1.5-7B's 32 (its default), the four stages see 100 %, 50 %, 25 % and 12.5 % of the image
tokens. The layers are the placement's (``placement: {layers: [8, 16, 24]}``); the default is the same quarters of
any model's depth (0.25, 0.5, 0.75 · decoder layers).

Follows Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py`` (``pdrop_rank_drop``; read for the rule,
not copied): after layer ``rank_layer − 1``, the last instruction token's softmax attention to the image tokens,
averaged over heads, ranks them, and the top ``int(N · ratio[stage + 1])`` stay. Deliberate differences:
- the scores are vtprune's fastv signal: computed with the weights of the last layer that still sees every token
  of the stage (``layers[K−1]``, on its input); the authors use the first pruned layer's q/k (``layers[K]``);
- each stage keeps ``ceil(λ · n)`` of the ``n`` tokens left (at least one) where the authors floor ``N · λ^s``;
- kept tokens keep their original rotary positions; the authors renumber the shortened sequence 0..S'−1 (and
  shift the decode positions to match);
- batch > 1 with left padding, per-sample budgets; ties go to the lower index;
- ``kept`` records the last stage's set, ``equivalent_tokens`` the layer-weighted average over all stages.
"""

from vtprune.strategies.base import register_strategy
from vtprune.strategies.fastv import keep_fastv


@register_strategy(
    "pdrop",
    needs=("last_token_attention",),
    stage="in_llm",
    placement={"layers": (0.25, 0.5, 0.75)},
)
def keep_pdrop(signals, budgets):
    """PyramidDrop: at each of several LLM stages keep keep_ratio of the remaining image tokens by last-token attention."""
    return keep_fastv(signals, budgets)
