"""The synthetic distribution's splits: held-out draws never show a training image; words pair up letter by letter."""

import hashlib
import random

import pytest

from vtprune.eval import synth


def _digest(s):
    return hashlib.sha256(s.image.tobytes()).hexdigest()


def test_held_out_splits_share_no_image_with_training():
    # The word images are few (a few thousand): independent draws of 3000 training words repeat images often, so an
    # unpartitioned held-out split would overlap it.
    train = synth.draw_split(synth.TRAIN_SEED, 3000, synth.WORD_KINDS) + synth.draw_split(
        synth.TRAIN_SEED, 2000, synth.SHAPE_KINDS)
    seen = {_digest(s) for s in train}
    assert len(seen) < len(train)  # repeats: the partition is what keeps the splits apart
    assert not any(synth.is_held_out(s.image) for s in train)
    for seed, kinds in ((synth.MINI_SEED, synth.SHAPE_KINDS), (synth.MINI_SEED + 1, synth.WORD_KINDS),
                        (synth.TEST_SEED, synth.KINDS)):
        held = synth.draw_split(seed, 60, kinds)
        assert all(synth.is_held_out(s.image) for s in held)
        assert not seen & {_digest(s) for s in held}


def test_about_a_quarter_of_images_is_held_out():
    rng = random.Random(7)
    flags = [synth.is_held_out(synth.sample(rng, synth.KINDS[i % 5]).image) for i in range(800)]
    assert 0.18 < sum(flags) / len(flags) < 0.32


def test_every_word_has_a_partner_one_letter_away():
    for w in synth.WORDS:
        partners = [v for v in synth.WORDS if v != w and len(v) == len(w) and sum(a != b for a, b in zip(v, w)) == 1]
        assert partners, w


def test_letter_boxes_cover_the_ink_of_their_letter():
    s = synth.sample(random.Random(3), "word")
    word = s.objects[0]
    assert "".join(ch for ch, _ in word["letters"]) == s.answer
    pixels = s.image.load()
    background = pixels[0, 0]
    inked = {(x, y) for x in range(synth.IMAGE_SIZE) for y in range(synth.IMAGE_SIZE) if pixels[x, y] != background}
    inside = {(x, y) for _, (x0, y0, x1, y1) in word["letters"] for x in range(x0, x1) for y in range(y0, y1)}
    assert inked and inked <= inside
    # letters follow each other left to right without overlapping
    boxes = [b for _, b in word["letters"]]
    assert all(a[2] <= b[0] + 1 for a, b in zip(boxes, boxes[1:]))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match=r"unknown kind 'size' \(allowed: colour, shape, count, position, word\)"):
        synth.sample(random.Random(0), "size")
