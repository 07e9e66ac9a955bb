"""Pipelines over one model, threads, and what a call leaves behind: hooks, RNG, padding side, progress bars."""

import dataclasses
import threading
import time

import pytest
import torch
from PIL import Image

import vtprune
from vtprune.api import Pipeline
from vtprune.errors import VtpruneError

IMAGES = [Image.new("RGB", (30, 70), (200, 20, 20)), Image.new("RGB", (90, 40), (20, 30, 210))]
PROMPTS = ["What is shown?", "How many objects are there in the picture please?"]
PRUNED = {"tiny:llava": "fastv", "tiny:mllama": "trimmed_llama"}  # strategies that hook the model


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = vtprune.load(model=model, strategy="uniform", keep_ratio=0.5)
        return cache[model]

    return get


@pytest.fixture(scope="module")
def pipe(loaded):
    return loaded("tiny:llava")


class Worker(threading.Thread):
    """Runs ``fn`` in another thread; ``result()`` waits for it and re-raises what it raised."""

    def __init__(self, fn, start=True):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        if start:
            self.start()

    def run(self):
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def result(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "the call did not finish in time"
        if self.error is not None:
            raise self.error
        return self.value


def hooks_on(model) -> int:
    """vtprune's hooks on any submodule (transformers installs output-capturing hooks of its own, for good)."""
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(getattr(h, "__module__", "").startswith("vtprune.") for h in hooks)


def with_selection(pipe, fn):
    """``pipe`` whose strategy runs ``fn(select)`` instead of selecting (inside the hooks, for hooking strategies)."""
    strategy = pipe.plan.strategy

    def run(*args, **kwargs):
        return fn(lambda: strategy.fn(*args, **kwargs))

    out = pipe.with_pruning()
    out.plan = dataclasses.replace(pipe.plan, strategy=dataclasses.replace(strategy, fn=run))
    return out


def pausing(pipe, inside: threading.Event, seconds=0.3):
    """``pipe`` whose first selection signals ``inside`` (its hooks are on the model) and then pauses there."""

    def fn(select):
        if not inside.is_set():
            inside.set()
            time.sleep(seconds)
        return select()

    return with_selection(pipe, fn)


def answers(results):
    return [(r.text, r.kept, r.num_visual) for r in results]


def prefill(pipe, inputs):
    with torch.no_grad():
        return pipe.adapter.prefill_logits(inputs, pipe.plan)[0]


# -- threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["uniform", "fastv"])
def test_unpruned_run_unaffected_by_a_pruned_call_in_another_thread(pipe, strategy):
    none = pipe.with_pruning("none", 1.0)
    inputs = none.prepare(IMAGES, PROMPTS)
    ref_logits = prefill(none, inputs)
    ref = answers(none.generate(IMAGES, PROMPTS, max_new_tokens=4))
    pruned = pipe.with_pruning(strategy, 0.25)
    pruned_alone = answers(pruned.generate(IMAGES, PROMPTS, max_new_tokens=4))
    for _ in range(3):
        inside = threading.Event()
        slow = pausing(pruned, inside)
        worker = Worker(lambda slow=slow: slow.generate(IMAGES, PROMPTS, max_new_tokens=4))
        assert inside.wait(30)
        logits = prefill(none, inputs)  # starts while the pruned call holds the model, mid-selection
        got = answers(none.generate(IMAGES, PROMPTS, max_new_tokens=4))
        assert answers(worker.result()) == pruned_alone
        assert torch.equal(logits, ref_logits)
        assert got == ref
    assert hooks_on(pipe.model) == 0


@pytest.mark.parametrize("model", ["tiny:llava", "tiny:mllama"])
def test_two_threads_generating_at_once_get_what_they_get_alone(loaded, model):
    base = loaded(model)
    # different strategies and batch sizes, so that one call running through the other's hooks cannot pass
    calls = [
        (base.with_pruning(PRUNED[model], 0.25), IMAGES, PROMPTS),
        (base.with_pruning("none", 1.0), IMAGES[:1], PROMPTS[:1]),
    ]
    alone = [answers(p.generate(images, prompts, max_new_tokens=4)) for p, images, prompts in calls]
    start = threading.Barrier(len(calls))

    def loop(p, images, prompts):
        start.wait()
        return [answers(p.generate(images, prompts, max_new_tokens=4)) for _ in range(4)]

    workers = [Worker(lambda call=call: loop(*call)) for call in calls]
    for worker, expected in zip(workers, alone):
        assert worker.result() == [expected] * 4
    assert hooks_on(base.model) == 0


def test_a_call_on_the_same_model_waits_and_another_model_does_not(pipe):
    none = pipe.with_pruning("none", 1.0)
    expected = answers(none.generate(IMAGES, PROMPTS, max_new_tokens=3))
    other = vtprune.load(model="tiny:llava", strategy="none")  # the same weights, loaded again
    fastv = pipe.with_pruning("fastv", 0.25)
    inputs = fastv.prepare(IMAGES, PROMPTS)
    with fastv.adapter.applied(inputs, fastv.plan):
        assert hooks_on(pipe.model) > 0
        assert answers(Worker(lambda: other.generate(IMAGES, PROMPTS, max_new_tokens=3)).result()) == expected
        same = Worker(lambda: none.generate(IMAGES, PROMPTS, max_new_tokens=3))
        same.join(0.5)
        assert same.is_alive()  # waiting for the model, not running through fastv's hooks
    assert answers(same.result()) == expected
    assert hooks_on(pipe.model) == 0


# -- the same thread -------------------------------------------------------------------------------------------


def test_a_call_from_inside_a_pruning_context_is_refused(pipe):
    none = pipe.with_pruning("none", 1.0)
    fastv = pipe.with_pruning("fastv", 0.25)
    inputs = fastv.prepare(IMAGES, PROMPTS)
    refused = "this thread already has pruning hooks on the model"
    with fastv.adapter.applied(inputs, fastv.plan):
        with pytest.raises(VtpruneError, match=refused):
            none.generate(IMAGES, PROMPTS, max_new_tokens=2)
        with pytest.raises(VtpruneError, match=refused):
            prefill(none, inputs)
        with pytest.raises(VtpruneError, match=refused), fastv.adapter.applied(inputs, fastv.plan):
            pass
        k = fastv.adapter.placement(fastv.plan).layer
        # only the open context's own: a pre-hook on layers[K-1:], the scoring hook on layers[K-1], its q/k captures
        assert hooks_on(pipe.model) == 1 + len(fastv.adapter.decoder_layers) - k + 3

    # from inside a hook: the strategy's selection runs in fastv's scoring hook
    reentrant = with_selection(fastv, lambda select: none.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=1))
    with pytest.raises(VtpruneError, match=refused):
        reentrant.generate(IMAGES, PROMPTS, max_new_tokens=2)
    assert hooks_on(pipe.model) == 0
    # a nested call with no hooks on is fine, and the refusals left the model free for every thread
    with pipe.adapter.exclusive():
        assert none.generate(IMAGES, PROMPTS, max_new_tokens=2)
    assert Worker(lambda: none.generate(IMAGES, PROMPTS, max_new_tokens=2)).result()


@pytest.mark.parametrize("model", ["tiny:llava", "tiny:mllama"])
def test_no_hooks_left_after_an_error_inside_a_call(loaded, model):
    base = loaded(model)

    def fail(select):
        raise RuntimeError("selection failed")

    broken = with_selection(base.with_pruning(PRUNED[model], 0.25), fail)
    with pytest.raises(RuntimeError, match="selection failed"):
        broken.generate(IMAGES, PROMPTS, max_new_tokens=2)
    assert hooks_on(base.model) == 0
    none = base.with_pruning("none", 1.0)
    assert Worker(lambda: none.generate(IMAGES, PROMPTS, max_new_tokens=2)).result()  # the model was released


# -- state the caller owns -------------------------------------------------------------------------------------


def test_padding_side_is_left_for_our_batch_and_the_callers_afterwards(pipe):
    tokenizer = pipe.processor.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        mask = pipe.prepare(IMAGES, PROMPTS)["attention_mask"]
        assert mask[:, -1].all() and not mask[:, 0].all()  # our batch: left padded
        pipe.generate(IMAGES, PROMPTS, max_new_tokens=1)
        assert tokenizer.padding_side == "right"
        assert tokenizer(["a", "a b c d"], padding=True)["attention_mask"][0][-1] == 0
    finally:
        tokenizer.padding_side = before


def test_sampling_is_seeded_per_call_and_leaves_the_global_rng_alone(pipe):
    gen = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": True, "top_k": 0, "temperature": 1.5}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = answers(pipe.generate(IMAGES, PROMPTS, **gen))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(7)  # the caller's own draws between calls do not change ours
    assert answers(pipe.generate(IMAGES, PROMPTS, **gen)) == first
    reseeded = Pipeline(pipe.config.replace(seed=pipe.config.seed + 1), pipe.adapter)
    assert answers(reseeded.generate(IMAGES, PROMPTS, **gen)) != first  # the draws do come from config.seed


def test_building_a_tiny_model_leaves_the_global_rng_alone(tmp_path):
    from safetensors.torch import load_file

    from vtprune.models import tiny

    before = torch.get_rng_state()
    tiny._build("llava", tmp_path)
    assert torch.equal(torch.get_rng_state(), before)
    built, cached = (load_file(next(d.glob("*.safetensors"))) for d in (tmp_path, tiny.tiny_path("llava")))
    assert built.keys() == cached.keys() and all(torch.equal(built[k], cached[k]) for k in built)  # still seeded


def test_load_keeps_the_callers_progress_bar_setting():
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    try:
        for enabled in (True, False):
            (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
            vtprune.load(model="tiny:llava")
            assert logging.is_progress_bar_enabled() is enabled
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()
