"""Every strategy on every self-attention family it runs on: keep 1.0 ≡ none, batched ≡ per-sample, the budget
(kept + merged) respected, and a merged token is the weighted mean of its sources' projector outputs."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference import plan

import vtprune
from vtprune.models import FAMILIES
from vtprune.strategies import STRATEGIES, budget

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY_NAMES = ["llava", "llava_next", "qwen2_5_vl", "llava_onevision", "internvl"]


def noise(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Different sizes and aspect ratios: different crop grids (llava_next), token counts (qwen2_5_vl), a grid the
# model downsamples (llava_onevision: 80×50), tile counts (internvl: 1×2 + thumbnail, 2×2 + thumbnail).
SIZES = {"llava_onevision": [(30, 70), (80, 50)], "internvl": [(30, 70), (100, 100)]}


def images(family):
    return [noise(w, h, seed) for seed, (w, h) in enumerate(SIZES.get(family, [(56, 56), (112, 56)]), start=1)]
PROMPTS = ["What is shown?", "How many objects are there in the picture please?"]


def cases():
    return [(f, s) for f in FAMILY_NAMES for s, strategy in STRATEGIES.items()
            if s != "none" and FAMILIES.get(f).runs(strategy)]


@pytest.fixture(scope="module")
def loaded(one_thread):
    out = {}
    for family in FAMILY_NAMES:
        adapter = vtprune.load(model=f"tiny:{family}", device="cpu", dtype="float32").adapter
        out[family] = (adapter, adapter.prepare(images(family), PROMPTS))
    return out


@pytest.mark.parametrize("family,name", cases())
def test_keep_all_equals_unpruned(loaded, family, name):
    adapter, inputs = loaded[family]
    with torch.no_grad():
        ref, _ = adapter.prefill_logits(inputs, plan("none"))
        logits, records = adapter.prefill_logits(inputs, plan(name, 1.0))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert all(r.kept == list(range(r.num_visual)) and r.merged == [] for r in records)


@pytest.mark.parametrize("family,name", cases())
def test_batched_equals_per_sample_within_budget(loaded, family, name):
    adapter, inputs = loaded[family]
    p = plan(name, 0.3)
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=adapter.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        for b in range(2):
            one = adapter.prepare(images(family)[b : b + 1], PROMPTS[b : b + 1])
            alone_logits, alone = adapter.prefill_logits(one, p)
            assert alone[0].kept == records[b].kept == gen_records[b].kept
            assert alone[0].merged == records[b].merged
            torch.testing.assert_close(alone_logits[0], logits[b], atol=1e-4, rtol=1e-4)
    for r in records:
        assert 1 <= r.num_kept <= budget(r.num_visual, 0.3)
        assert set(r.merged) <= set(r.kept)
        assert STRATEGIES.get(name).merges or not r.merged  # a strategy that merges says so (its kind)
    assert torch.equal(new[:, 0], logits.argmax(-1))


# The strategies that declare merges; Qwen2.5-VL downsamples the image itself (tested in test_qwen2_5_vl.py), the
# others merge in the splice.
MERGING = [(f, s) for f, s in cases() if STRATEGIES.get(s).merges and STRATEGIES.get(s).stage == "pre_llm"
           and not (f == "qwen2_5_vl" and STRATEGIES.get(s).merge_space == "input")]


@pytest.mark.parametrize("family,name", MERGING)
def test_a_merged_token_is_the_weighted_mean_of_its_sources(loaded, family, name):
    adapter, inputs = loaded[family]
    p = plan(name, 0.25)
    with torch.no_grad():
        visual = adapter.visual_tokens(inputs)
        selections, _ = p.select(adapter.signals(inputs, visual, p.strategy.needs))
        spliced, records = adapter.spliced(inputs, p)
    assert any(s.num_merged for s in selections)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b, selection in enumerate(selections):
        image_pos = torch.nonzero(ids[b] == adapter.image_token_id).flatten()
        stay = mask[b] & (ids[b] != adapter.image_token_id)
        stay[image_pos[selection.slots]] = True
        row = spliced["inputs_embeds"][b][spliced["attention_mask"][b].bool()]
        place = {int(pos): i for i, pos in enumerate(torch.nonzero(stay).flatten())}
        feats = visual.features[b]
        before = p.strategy.merge_space in ("vision", "input")  # averaged before the projector, then projected
        if before:
            vectors, project = adapter.pre_projector(inputs, visual)
        for m, anchor in enumerate(selection.anchors.tolist()):
            sources = torch.nonzero(selection.weights[m]).flatten()
            if before:
                expected = project((selection.weights[m, sources, None] * vectors[b][sources]).sum(0))
                assert not torch.allclose(expected, (selection.weights[m, sources, None] * feats[sources]).sum(0))
            else:
                expected = (selection.weights[m, sources, None] * feats[sources]).sum(0)
            torch.testing.assert_close(row[place[int(image_pos[anchor])]], expected, atol=1e-5, rtol=1e-5)
        for k in selection.kept.tolist():
            torch.testing.assert_close(row[place[int(image_pos[k])]], feats[k])
        assert records[b].merged == selection.anchors.tolist()


IN_LLM_MERGING = [(f, s) for f, s in cases() if STRATEGIES.get(s).merges and STRATEGIES.get(s).stage == "in_llm"]


@pytest.mark.parametrize("family,name", IN_LLM_MERGING)
def test_an_in_llm_strategy_that_merges_does(loaded, family, name):
    # the hidden states it merges are checked in test_in_llm_merge.py; here, that its merges reach the records
    adapter, inputs = loaded[family]
    with torch.no_grad():
        _, records = adapter.prefill_logits(inputs, plan(name, 0.3))
    assert any(r.merged for r in records)


@pytest.mark.parametrize("name", [s for f, s in cases() if f == "llava" and STRATEGIES.get(s).stage == "pre_llm"])
def test_a_strategy_that_says_it_fills_the_budget_does(loaded, name):
    # what vLLM relies on (its prompt holds one placeholder per token of the budget): the others it refuses
    adapter, inputs = loaded["llava"]
    strategy = STRATEGIES.get(name)
    counts = {}
    for ratio in (0.1, 0.3, 0.5, 0.7, 0.9):
        with torch.no_grad():
            _, records = adapter.prefill_logits(inputs, plan(name, ratio))
        counts[ratio] = [(r.num_kept, budget(r.num_visual, ratio)) for r in records]
    exact = all(kept == b for pairs in counts.values() for kept, b in pairs)
    assert exact == strategy.fills(), counts
