"""Fidelity of a pruned model to its own unpruned self: answer loyalty, first-token top-1 agreement and KL.

Accuracy needs a model that can answer; fidelity does not: it compares each pruned answer with the unpruned
answer of the *same* model to the same document, so it means something for random-weight tiny models too.

- *loyalty*: the two answers are equal after lmms-eval's VQA answer normalisation (``EvalAIAnswerProcessor``);
- *top-1 agreement*: the most likely first generated token is the same;
- *KL(unpruned ‖ pruned)* of the first generated token's distribution. Only the top ``TOP_K`` log-probabilities of
  each side are stored (``first_topk`` in samples.jsonl), so the KL is taken over the tokens both top-k lists hold
  plus one bin lumping all the rest on each side. Lumping is a coarse-graining, so this is a lower bound of the
  full-vocabulary KL, equal to it when the two top-k lists hold all the mass.
"""

from __future__ import annotations

import contextlib
import functools
import math
from statistics import mean

TOP_K = 20  # log-probabilities of the first generated token stored per sample
_FLOOR = 1e-12  # a lumped remainder rounded to 0 on one side only must not give an infinite KL


@contextlib.contextmanager
def first_token_topk(model, batch_size: int, k: int = TOP_K):
    """Record the top-``k`` log-probabilities of the first generated token of each sample, during one ``generate``.

    Hooks the output embedding (``lm_head``), whose first call in a ``generate`` is the prefill's last position:
    the raw next-token logits, before any temperature or top-p processing, so fidelity is independent of the
    sampling settings. Yields a list filled with one ``{"ids": [...], "logprobs": [...]}`` per sample, most likely
    first (empty if the model was never called). Beams (rows = batch × beams) are identical at the first step: one
    row per sample is kept.
    """
    import torch

    captured: list[dict] = []

    def hook(module, args, output):
        if captured or output.shape[0] % batch_size:
            return
        logits = output[:, -1] if output.dim() == 3 else output
        logits = logits[:: logits.shape[0] // batch_size].float()
        top = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        captured.extend({"ids": i.tolist(), "logprobs": v.tolist()} for i, v in zip(top.indices, top.values))

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def kl_lumped(ref: dict, other: dict) -> float:
    """KL(ref ‖ other) in nats over the tokens in both top-k lists, the rest of each side lumped into one bin."""
    p = dict(zip(ref["ids"], ref["logprobs"]))
    q = dict(zip(other["ids"], other["logprobs"]))
    shared = [t for t in p if t in q]
    kl = math.fsum(math.exp(p[t]) * (p[t] - q[t]) for t in shared)
    p_rest = max(0.0, 1.0 - math.fsum(math.exp(p[t]) for t in shared))
    q_rest = max(0.0, 1.0 - math.fsum(math.exp(q[t]) for t in shared))
    if p_rest > _FLOOR:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, _FLOOR)))
    return max(0.0, kl)  # rounding may leave -1e-17 for identical distributions


def top1_agrees(ref: dict, other: dict) -> bool:
    return bool(ref["ids"]) and bool(other["ids"]) and ref["ids"][0] == other["ids"][0]


def normalise(answer) -> str:
    """lmms-eval's VQA answer normalisation (punctuation, articles, number words to digits, contractions)."""
    return _processor()(str(answer))


@functools.lru_cache(maxsize=1)
def _processor():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    return EvalAIAnswerProcessor()


def compare(reference: list[dict], samples: list[dict]) -> tuple[dict, dict]:
    """Per-sample fidelity of ``samples`` to ``reference`` (samples.jsonl rows), matched on (task, doc_id).

    Returns ``{(task, doc_id): {"loyal", "top1_agree", "kl"}}`` (``top1_agree`` / ``kl`` None where either side has
    no ``first_topk``) and the summary per task: ``{task: {"loyalty", "top1_agreement", "kl_mean", "n"}}``.
    """
    ref = {(r["task"], r["doc_id"]): r for r in reference}
    per_sample, by_task = {}, {}
    for s in samples:
        r = ref.get((s["task"], s["doc_id"]))
        if r is None:
            continue
        both = bool(r.get("first_topk")) and bool(s.get("first_topk"))
        row = {
            "loyal": normalise(r["output"]) == normalise(s["output"]),
            "top1_agree": top1_agrees(r["first_topk"], s["first_topk"]) if both else None,
            "kl": kl_lumped(r["first_topk"], s["first_topk"]) if both else None,
        }
        per_sample[(s["task"], s["doc_id"])] = row
        by_task.setdefault(s["task"], []).append(row)
    return per_sample, {task: summarise(rows) for task, rows in by_task.items()}


def summarise(rows: list[dict]) -> dict:
    def avg(key):
        values = [float(r[key]) for r in rows if r[key] is not None]
        return mean(values) if values else None

    return {"loyalty": avg("loyal"), "top1_agreement": avg("top1_agree"), "kl_mean": avg("kl"), "n": len(rows)}
