"""vtprune on vLLM against vtprune on Hugging Face, on the shipped micro:llava, micro:llava_next,
micro:llava_onevision and micro:qwen2_5_vl (CPU, greedy). (The tiny models cannot serve: their 16-wide attention
heads are not among vLLM's CPU attention head sizes.)

Runs in the vLLM environment only (``scripts/install-vllm.sh``; `.ci/run` runs it there); the main environment skips
it. One engine per family serves every test: each request carries its own pruning plan. The HF engine runs in the
same process, on the same checkpoint, as the reference.
"""

import pytest

pytest.importorskip("vllm")

from vtprune.eval import synth  # noqa: E402
from vtprune.strategies import STRATEGIES, budget  # noqa: E402
from vtprune.vllm import check, supported  # noqa: E402

CONFIGS = {"llava": "configs/micro/micro-llava-adav.yaml", "llava_next": "configs/micro/micro-llava-next.yaml",
           "qwen2_5_vl": "configs/micro/micro-qwen2.5-vl.yaml",
           "llava_onevision": "configs/micro/micro-llava-onevision.yaml"}
#: visual tokens of a 64 x 64 mini image: 8 x 8 CLIP patches; a base view of 8 x 8, then 2 x 2 crops of 4 x 4 patches
#: stitched into 8 x 8 with a newline closing each of its 8 rows (OneVision: a base view of 8 x 8, one crop of 8 x 8
#: with a newline per row); 8 x 8 patches merged 2 x 2
NUM_VISUAL = {"llava": 64, "llava_next": 136, "qwen2_5_vl": 16, "llava_onevision": 136}
POST = "\nAnswer the question using a single word or phrase."  # the mini tasks' post_prompt
ON_VLLM = [name for name, s in STRATEGIES.items() if name != "none" and all(supported(f, s) for f in CONFIGS)]


def mini_samples():
    """Eight shape questions and eight word questions of the mini tasks, prompted as their YAMLs prompt them."""
    shapes = synth.draw_split(synth.MINI_SEED, 8, synth.SHAPE_KINDS)
    words = synth.draw_split(synth.MINI_SEED + 1, 8, synth.WORD_KINDS)
    return [(s.image, f"{s.question}{POST}", s.answer) for s in shapes] + [
        (s.image, f"{s.question.capitalize()}{POST}", s.answer) for s in words]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def engines(family):
    import vtprune
    from vtprune.config import load_config
    from vtprune.vllm.engine import VllmPipeline

    return vtprune.load(CONFIGS[family]), VllmPipeline.start(load_config(CONFIGS[family]))


@pytest.fixture(scope="module")
def samples():
    return mini_samples()


def both(engines, samples, strategy, ratio):
    hf, served = engines
    images, prompts = [s[0] for s in samples], [s[1] for s in samples]
    hf_out = [hf.with_pruning(strategy, ratio).generate([i], [p], max_new_tokens=8)[0] for i, p in zip(images, prompts)]
    return hf_out, served.with_pruning(strategy, ratio).generate(images, prompts, max_new_tokens=8)


def test_the_strategies_on_vllm_are_the_same_for_every_family():
    assert ON_VLLM == [name for name, s in STRATEGIES.items() if name != "none" and supported("qwen2_5_vl", s)] == [
        "adav", "cdpruner", "cls_saliency", "divprune", "fastervlm", "gprune", "hired", "prumerge", "prumerge_plus",
        "random", "text_sim", "uniform", "visionzip", "vispruner"]


def test_unpruned_answers_equal_hf(engines, samples, family):
    hf_out, vllm_out = both(engines, samples, "none", 1.0)
    assert [r.text for r in vllm_out] == [r.text for r in hf_out]
    assert [r.num_visual for r in vllm_out] == [r.num_visual for r in hf_out] == [NUM_VISUAL[family]] * len(samples)


@pytest.mark.parametrize("strategy", ON_VLLM)
def test_kept_sets_equal_hf(engines, samples, strategy):
    hf_out, vllm_out = both(engines, samples, strategy, 0.25)
    assert [(r.kept, r.merged) for r in vllm_out] == [(r.kept, r.merged) for r in hf_out]
    assert all(1 <= len(r.kept) <= budget(r.num_visual, 0.25) for r in vllm_out)
    assert [r.text for r in vllm_out] == [r.text for r in hf_out]


def test_accuracy_under_pruning_matches_hf(engines, samples):
    hf_out, vllm_out = both(engines, samples, "adav", 0.25)
    gold = [s[2] for s in samples]
    accuracy = [sum(r.text.lower() == g for r, g in zip(out, gold)) / len(gold) for out in (hf_out, vllm_out)]
    assert accuracy[0] == accuracy[1] > 0.5


def test_prompt_shrinks_by_exactly_the_pruned_count(engines, samples, family):
    _, served = engines
    n = NUM_VISUAL[family]
    image, prompt, _ = samples[0]
    lengths = {}
    for ratio in (1.0, 0.5, 0.25):
        pipe = served.with_pruning("none" if ratio == 1.0 else "uniform", ratio)
        lengths[ratio] = len(pipe.llm.generate([pipe.request(image, prompt)], use_tqdm=False)[0].prompt_token_ids)
    assert lengths[1.0] - lengths[0.5] == n - budget(n, 0.5)
    assert lengths[1.0] - lengths[0.25] == n - budget(n, 0.25)


def test_one_engine_serves_mixed_plans_in_one_batch(engines, samples):
    """Pruned and unpruned requests scheduled together: each gets its own plan's selection and answer."""
    hf, served = engines
    plans = [("none", 1.0), ("adav", 0.25), ("uniform", 0.5), ("random", 0.25)] * 2
    requests = [served.with_pruning(s, r).request(img, p) for (s, r), (img, p, _) in zip(plans, samples)]
    outputs = served.llm.generate(requests, served.sampling(max_new_tokens=8), use_tqdm=False)
    for (strategy, ratio), (img, prompt, _), out in zip(plans, samples, outputs):
        ref = hf.with_pruning(strategy, ratio).generate([img], [prompt], max_new_tokens=8)[0]
        assert out.outputs[0].text.strip() == ref.text, (strategy, ratio)
        assert len(out.prompt_token_ids) == ref.input_tokens - ref.num_visual + len(ref.kept)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl"], indirect=True)
@pytest.mark.parametrize("strategy,ratio", [("none", 1.0), ("adav", 0.25), ("uniform", 0.5)])
def test_non_square_images_give_the_hf_engines_tokens_and_positions(engines, family, strategy, ratio):
    """LLaVA-NeXT: the anyres packing (crops, unpadding, newlines) and every map packed with it, on tall and wide
    images; LLaVA-OneVision: the same, and downsampled (anyres_max_1: the tall image's 16 x 8 patches to 11 x 5, the
    wide one's 8 x 16 to 5 x 11; every map interpolated with the features). Qwen2.5-VL (M-RoPE): each kept token at
    its place on the merged grid, the text after the image where it would be after the whole grid (``max(h, w)`` on:
    a tall image is where vLLM's video-pruning layout, which puts the grid's width there, would differ). The first
    token's log-probabilities are the sharpest check: they see every token and position."""
    hf, served = engines
    shape = synth.draw_split(synth.MINI_SEED, 2, synth.SHAPE_KINDS)
    images = [shape[0].image.resize((64, 128)), shape[1].image.resize((128, 64))]  # Qwen: tall 8 x 4, wide 4 x 8 merged
    prompts = [f"{s.question}{POST}" for s in shape]
    hf_out, vllm_out = both((hf, served), list(zip(images, prompts)), strategy, ratio)
    assert [r.num_visual for r in vllm_out] == [r.num_visual for r in hf_out]
    if family in ("qwen2_5_vl", "llava_onevision"):
        assert [r.num_visual for r in hf_out] == {"qwen2_5_vl": [32, 32], "llava_onevision": [130, 124]}[family]
    assert [r.kept for r in vllm_out] == [r.kept for r in hf_out]
    assert [r.text for r in vllm_out] == [r.text for r in hf_out]
    for h, v in zip(hf_out, vllm_out):
        assert v.first_topk["ids"][:3] == h.first_topk["ids"][:3]
        assert v.first_topk["logprobs"][:3] == pytest.approx(h.first_topk["logprobs"][:3], abs=1e-4)


@pytest.mark.parametrize("strategy", ["fastv", "pdrop"])
def test_in_llm_strategies_are_refused(strategy):
    from vtprune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"'{strategy}' cannot run on vLLM: it prunes inside the LLM"):
        check("llava", STRATEGIES.get(strategy))
