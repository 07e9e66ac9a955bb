"""Fidelity to the unpruned model (vtprune.fidelity): the lumped KL and the agreements on hand-made distributions,
and the first token's top-k as the pipeline records it."""

import math

import pytest
import torch
from PIL import Image

import vtprune
from vtprune.fidelity import compare, first_token_topk, kl_lumped, normalise, top1_agrees


def dist(probs: dict) -> dict:
    """A stored top-k: ids most likely first, natural-log probabilities."""
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    return {"ids": [i for i, _ in ranked], "logprobs": [math.log(p) for _, p in ranked]}


def test_identical_distributions_have_zero_kl():
    p = dist({3: 0.5, 9: 0.2, 1: 0.1})
    assert kl_lumped(p, p) == 0.0
    assert top1_agrees(p, p)


def test_kl_over_the_same_ids_with_the_rest_lumped():
    # Both top-2 lists hold ids 5 and 7; the remaining 0.2 / 0.25 is one bin on each side.
    p, q = dist({5: 0.5, 7: 0.3}), dist({7: 0.5, 5: 0.25})
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.25)
    assert kl_lumped(p, q) == pytest.approx(expected, abs=1e-12)
    assert not top1_agrees(p, q)


def test_ids_in_one_list_only_fall_into_the_rest():
    # Shared: id 2 only. p: 2 -> 0.3, rest 0.7 (id 1's 0.6 included); q: 2 -> 0.4, rest 0.6.
    p, q = dist({1: 0.6, 2: 0.3}), dist({2: 0.4, 3: 0.5})
    expected = 0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6)
    assert kl_lumped(p, q) == pytest.approx(expected, abs=1e-12)
    # KL is not symmetric: the reference's mass weighs the terms.
    reverse = 0.4 * math.log(0.4 / 0.3) + 0.6 * math.log(0.6 / 0.7)
    assert kl_lumped(q, p) == pytest.approx(reverse, abs=1e-12)


def test_full_support_gives_the_exact_kl_and_a_top_k_gives_a_lower_bound():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(30, generator=gen, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(30, generator=gen, dtype=torch.float64) * 2, 0)
        exact = float((p * (p.log() - q.log())).sum())

        def top(x, k):
            v, i = x.topk(k)
            return {"ids": i.tolist(), "logprobs": v.log().tolist()}

        assert kl_lumped(top(p, 30), top(q, 30)) == pytest.approx(exact, rel=1e-9, abs=1e-12)
        assert kl_lumped(top(p, 5), top(q, 5)) <= exact + 1e-12


def test_answers_compare_after_lmms_evals_normalisation():
    assert normalise("Two.") == normalise("2") == "2"
    assert normalise("A red circle") == normalise("red circle")
    assert normalise("red") != normalise("blue")


def test_compare_matches_samples_by_task_and_document():
    ref = [
        {"task": "t", "doc_id": 0, "output": "Two", "first_topk": dist({5: 0.5, 7: 0.3})},
        {"task": "t", "doc_id": 1, "output": "red", "first_topk": dist({5: 0.9})},
        {"task": "u", "doc_id": 0, "output": "yes", "first_topk": None},
    ]
    pruned = [
        {"task": "t", "doc_id": 1, "output": "blue", "first_topk": dist({5: 0.9})},
        {"task": "t", "doc_id": 0, "output": "2", "first_topk": dist({7: 0.5, 5: 0.25})},
        {"task": "u", "doc_id": 0, "output": "Yes", "first_topk": dist({1: 0.5})},
        {"task": "t", "doc_id": 7, "output": "x", "first_topk": None},  # no reference sample: not compared
    ]
    per_sample, by_task = compare(ref, pruned)
    kl0 = 0.5 * math.log(2) + 0.3 * math.log(0.6) + 0.2 * math.log(0.8)
    assert per_sample[("t", 0)] == {"loyal": True, "top1_agree": False, "kl": pytest.approx(kl0)}
    assert per_sample[("t", 1)] == {"loyal": False, "top1_agree": True, "kl": 0.0}
    assert per_sample[("u", 0)] == {"loyal": True, "top1_agree": None, "kl": None}
    assert ("t", 7) not in per_sample
    assert by_task["t"] == {"loyalty": 0.5, "top1_agreement": 0.5, "kl_mean": pytest.approx(kl0 / 2), "n": 2}
    assert by_task["u"] == {"loyalty": 1.0, "top1_agreement": None, "kl_mean": None, "n": 1}


@pytest.fixture(scope="module")
def llava():
    return vtprune.load(model="tiny:llava")


IMAGES = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (30, 70), (20, 30, 230))]
PROMPTS = ["What color is it?", "How many shapes are there in the picture?"]


def test_first_token_topk_is_the_prefill_distribution(llava):
    # The recorded top-k is the log-softmax of the prefill's last-position logits, per sample of a padded batch.
    inputs = llava.prepare(IMAGES, PROMPTS)
    with torch.no_grad():
        logits, _ = llava.adapter.prefill_logits(inputs, llava.plan)
    expected = torch.log_softmax(logits.float(), -1).topk(20, -1)
    out = llava.generate(IMAGES, PROMPTS, max_new_tokens=3, do_sample=False)
    for b, result in enumerate(out):
        assert result.first_topk["ids"] == expected.indices[b].tolist()
        torch.testing.assert_close(torch.tensor(result.first_topk["logprobs"]), expected.values[b], atol=1e-5, rtol=0)
    # The greedy first token is the recorded top-1, with a pruned (spliced) input as well.
    plan = llava.with_pruning("uniform", 0.5).plan
    with torch.no_grad(), first_token_topk(llava.model, len(IMAGES), k=5) as first:
        new_ids, _ = llava.adapter.generate(inputs, plan, max_new_tokens=2, do_sample=False, min_new_tokens=2)
    assert [f["ids"][0] for f in first] == new_ids[:, 0].tolist()
    assert all(len(f["ids"]) == 5 for f in first)


def test_first_token_topk_with_beams_and_sampling_is_the_raw_distribution(llava):
    greedy = llava.generate(IMAGES, PROMPTS, max_new_tokens=2, do_sample=False)
    for gen in ({"num_beams": 2}, {"do_sample": True, "temperature": 0.3, "top_k": 3}):
        other = llava.generate(IMAGES, PROMPTS, max_new_tokens=2, **gen)
        for a, b in zip(greedy, other):
            assert a.first_topk["ids"] == b.first_topk["ids"]
            assert kl_lumped(a.first_topk, b.first_topk) < 1e-9


@pytest.mark.parametrize("family,strategy", [("llava", "uniform"), ("llava", "fastv"), ("qwen2_5_vl", "random")])
def test_keep_all_is_loyal_with_zero_kl(family, strategy, llava):
    pipe = llava if family == "llava" else vtprune.load(model=f"tiny:{family}")
    ref = pipe.generate(IMAGES, PROMPTS, max_new_tokens=4, do_sample=False)
    kept_all = pipe.with_pruning(strategy, 1.0).generate(IMAGES, PROMPTS, max_new_tokens=4, do_sample=False)
    pruned = pipe.with_pruning(strategy, 0.25).generate(IMAGES, PROMPTS, max_new_tokens=4, do_sample=False)

    def rows(results):
        return [{"task": "t", "doc_id": i, "output": r.text, "first_topk": r.first_topk} for i, r in enumerate(results)]

    _, same = compare(rows(ref), rows(kept_all))
    assert same["t"]["loyalty"] == 1.0 and same["t"]["top1_agreement"] == 1.0
    assert same["t"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    _, cut = compare(rows(ref), rows(pruned))
    assert cut["t"]["kl_mean"] > 1e-4  # a quarter of the tokens changes the distribution: the KL can see pruning
