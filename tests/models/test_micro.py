"""The shipped micro models: trained checkpoints that answer the synthetic visual-QA distribution.

Accuracy is measured through the real pipeline (``vtprune.load`` + ``generate``, greedy) on a held-out seed that
neither training nor the mini tasks use, scored with lmms-eval's own answer normalisation. The wrong-kept-set check
shows that the answers come from the visual tokens a strategy keeps: on questions about one small object, the
complement of the family's headline strategy's kept set at keep 0.25 (about three times as many tokens) scores lower than
the kept set itself (AdaV on llava, llava_next, llava_onevision and qwen2_5_vl, Trimmed Llama at an exact budget on mllama).
"""

import pytest
import torch
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

import vtprune
from vtprune.errors import ConfigError
from vtprune.eval import synth
from vtprune.models import micro_families, resolve_path
from vtprune.models.base import PrunePlan
from vtprune.strategies.base import Strategy

FAMILIES = micro_families()
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the mini tasks' (official) post prompt
TARGETS = {"shapes": 0.8, "word": 0.6}
HEADLINE = {"llava": ("adav", {}), "mllama": ("trimmed_llama", {"mode": "budget"}), "llava_next": ("adav", {}),
            "qwen2_5_vl": ("adav", {}), "llava_onevision": ("adav", {})}

_normalise = EvalAIAnswerProcessor()


def prompt(s):
    return (s.question.capitalize() if s.kind == "word" else s.question) + POST_PROMPT


def correct(outputs, samples):
    return [_normalise(o) == _normalise(s.answer) for o, s in zip(outputs, samples)]


def answers(pipe, samples, batch=16):
    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        results = pipe.generate([s.image for s in chunk], [prompt(s) for s in chunk], max_new_tokens=4, do_sample=False)
        out += [r.text for r in results]
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return vtprune.load(model=f"micro:{request.param}")


def test_every_family_is_shipped_and_unknown_names_are_one_line():
    assert "llava" in FAMILIES
    with pytest.raises(ConfigError, match=r"unknown micro model 'micro:nope' \(allowed: micro:llava"):
        resolve_path("micro:nope")


@pytest.mark.parametrize("task", ["shapes", "word"])
def test_accuracy_on_a_held_out_set(pipe, task):
    if task == "word":
        samples = synth.draw_split(synth.TEST_SEED + 1, 30, synth.WORD_KINDS)
    else:
        samples = synth.draw_split(synth.TEST_SEED, 40, synth.SHAPE_KINDS)
    hits = correct(answers(pipe, samples), samples)
    assert sum(hits) / len(hits) >= TARGETS[task], f"{sum(hits)}/{len(hits)}"


def _small_object_questions(n=32, largest=12):
    """Colour / shape questions whose object is at most ``largest`` px wide."""
    import random

    rng = random.Random(synth.TEST_SEED + 2)
    out = []
    while len(out) < n:
        s = synth.sample(rng, ("colour", "shape")[len(out) % 2], held_out=True)
        x0, _, x1, _ = s.boxes[0]
        if x1 - x0 <= largest:
            out.append(s)
    return out


def _fixed(kept_sets):
    """A strategy that keeps the given indices, one list per sample of the batch."""

    def fn(signals, budgets, **_):
        return [torch.tensor(k, dtype=torch.long) for k in kept_sets]

    return Strategy("fixed", fn)


def test_the_complement_of_a_strategys_kept_set_scores_lower(pipe):
    samples = _small_object_questions()
    images, prompts = [s.image for s in samples], [prompt(s) for s in samples]
    name, options = HEADLINE[pipe.adapter.family]
    chosen = pipe.with_pruning(name, 0.25, options=options).generate(images, prompts, max_new_tokens=4, do_sample=False)
    adapter, tok = pipe.adapter, pipe.processor.tokenizer
    complement = [sorted(set(range(r.num_visual)) - set(r.kept)) for r in chosen]
    assert all(len(c) >= 2.5 * len(r.kept) for c, r in zip(complement, chosen))  # 3x, less the budget's rounding
    with torch.inference_mode():
        new_ids, records = adapter.generate(
            pipe.prepare(images, prompts), PrunePlan(_fixed(complement), 0.75), max_new_tokens=4, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert [r.kept for r in records] == complement
    wrong = tok.batch_decode(new_ids, skip_special_tokens=True)
    right_hits, wrong_hits = sum(correct([r.text for r in chosen], samples)), sum(correct(wrong, samples))
    assert right_hits > wrong_hits, (right_hits, wrong_hits)


def test_micro_configs_are_checked_without_loading(tmp_path):
    from vtprune.config import load_config

    def check(text):
        (tmp_path / "c.yaml").write_text(text)
        return load_config(tmp_path / "c.yaml")

    assert {"llava", "mllama"} <= set(FAMILIES)
    allowed = ", ".join(f"micro:{f}" for f in FAMILIES)
    with pytest.raises(ConfigError, match=rf"model.path: 'micro:foo' is not allowed \(allowed: {allowed}\)"):
        check("model: {path: 'micro:foo'}\n")
    # The family and the decoder depth come from the shipped config alone.
    with pytest.raises(ConfigError, match=r"outside the allowed range \[1, 3\] for micro:llava \(4 decoder layers\)"):
        check("model: {path: 'micro:llava'}\npruning: {strategy: fastv, keep_ratio: 0.5, placement: {layer: 9}}\n")
    with pytest.raises(ConfigError, match="'trimmed_llama' needs the signal 'cross_attention'"):
        check("model: {path: 'micro:llava'}\npruning: {strategy: trimmed_llama, keep_ratio: 0.5}\n")


def test_micro_mllama_vision_tokens_are_patch_local():
    """Changing one 8 px patch of the image changes exactly that patch's vision token (and no CLS token): the micro
    tower has no attention (scripts/train_micro.py, ``make_patch_local``), so a kept set is all the model sees."""
    from PIL import Image

    pipe = vtprune.load(model="micro:mllama")
    base = Image.new("RGB", (synth.IMAGE_SIZE, synth.IMAGE_SIZE), "white")
    changed = base.copy()
    changed.paste((200, 0, 0), (40, 8, 48, 16))  # patch row 1, column 5 of the 8x8 grid: tile 1, patch (1, 1)

    def tokens(image):
        inputs = pipe.prepare([image], ["What color is the square?"])
        with torch.inference_mode():
            out = pipe.model.model.vision_model(
                pixel_values=inputs["pixel_values"].float(), aspect_ratio_ids=inputs["aspect_ratio_ids"],
                aspect_ratio_mask=inputs["aspect_ratio_mask"],
            )
        return out.last_hidden_state[0, 0].flatten(0, 1)  # [tiles * (CLS + 16 patches), D]

    before, after = tokens(base), tokens(changed)
    differs = ((before - after).abs().amax(-1) > 1e-4).nonzero().flatten().tolist()
    assert differs == [17 + 1 + 1 * 4 + 1]
