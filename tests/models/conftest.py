"""Fixtures of the family tests. A module that uses ``inputs`` defines ``IMAGES`` (two, for ``PROMPTS``) and an
``adapter`` fixture; one that runs its tiny model on one thread marks itself
``pytestmark = pytest.mark.usefixtures("one_thread")``."""

import pytest
import torch
from checks import PROMPTS


@pytest.fixture(scope="module")
def one_thread():
    # A tiny model gains nothing from intra-op threads, and on a shared CPU their spin-waits make every op up to
    # 100x slower; restored for the tests that run after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(adapter, request):
    return adapter.prepare(request.module.IMAGES, PROMPTS)


@pytest.fixture(scope="module")
def gen(adapter):
    return {"max_new_tokens": 4, "do_sample": False, "pad_token_id": adapter.processor.tokenizer.pad_token_id}
