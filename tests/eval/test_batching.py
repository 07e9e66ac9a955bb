"""Batches of like-sized images: the eval model sorts each task's requests by the visual tokens their images will make
(counted from the image size alone), so that a batch's kept sets pad few tokens, and answers in request order."""

from types import SimpleNamespace

import pytest
from PIL import Image

import vtprune
from vtprune.api import kept_padding
from vtprune.eval.lmms_model import VtpruneLMM

SIZES = [(64, 48), (48, 64), (100, 40), (200, 200), (37, 90)]  # width, height


def _image(size, seed: int) -> Image.Image:
    image = Image.new("RGB", size, (40 * seed % 256, 90, 200 - 30 * seed % 200))
    image.paste((250, 250, 0), (2, 2, size[0] // 2, size[1] // 3))
    return image


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "internvl", "mllama"])
def test_visual_tokens_for_size_is_what_the_model_makes(family):
    pipe = vtprune.load(model=f"tiny:{family}", strategy="none", keep_ratio=1.0)
    images = [_image(size, i) for i, size in enumerate(SIZES)]
    results = pipe.generate(images, ["What is shown?"] * len(images), max_new_tokens=1)
    assert [r.num_visual for r in results] == [pipe.adapter.visual_tokens_for_size(h, w) for w, h in SIZES]


def _requests(images):
    docs = [{"image": image} for image in images]
    args = [("What is shown?", {"max_new_tokens": 3}, lambda doc: [doc["image"]], i, "t", "test") for i in range(len(docs))]
    requests = [SimpleNamespace(args=a) for a in args]
    return docs, requests


def test_eval_batches_like_sized_images_and_answers_in_request_order():
    pipe = vtprune.load(model="tiny:qwen2_5_vl", strategy="uniform", keep_ratio=0.5)
    small, big = (56, 56), (112, 112)  # 16 and 36 visual tokens on the tiny model
    images = [_image(size, i) for i, size in enumerate([small, big, small, big, big])]
    docs, requests = _requests(images)
    lm = VtpruneLMM(pipeline=pipe, batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    out = lm.generate_until(requests)

    alone = [pipe.generate([image], ["What is shown?"], max_new_tokens=3)[0] for image in images]
    assert [o.text for o in out] == [a.text.strip() for a in alone]  # request order, batched ≡ one at a time
    stats = [lm.stats[("t", i)] for i in range(len(images))]
    assert [s.num_kept for s in stats] == [8, 18, 8, 18, 18]
    # biggest first: (big, big), (big, small), (small): only the mixed batch pads, one small sample's 10 slots
    assert [s.kept_slots for s in stats] == [18, 18, 8, 18, 18]
    assert kept_padding([s.num_kept for s in stats], [s.kept_slots for s in stats]) == pytest.approx(10 / 80)

    # in request order the batches would be (small, big), (small, big), (big): both small samples padded
    unsorted = pipe.generate(images[:2], ["What is shown?"] * 2, max_new_tokens=1)
    assert [r.kept_slots for r in unsorted] == [18, 18]


def test_a_batch_of_one_keeps_the_request_order(monkeypatch):
    pipe = vtprune.load(model="tiny:qwen2_5_vl", strategy="uniform", keep_ratio=0.5)
    docs, requests = _requests([_image((56, 56), 0), _image((112, 112), 1)])
    lm = VtpruneLMM(pipeline=pipe, batch_size=1)
    lm.task_dict = {"t": {"test": docs}}
    seen = []
    monkeypatch.setattr(lm, "_generate_chunk", lambda chunk: seen.append(chunk[0][3]) or [SimpleNamespace()])
    lm.generate_until(requests)
    assert seen == [0, 1]
