"""A synthetic visual-QA distribution drawn with PIL, deterministic from a seed: the micro models' training data
and the offline mini tasks' samples.

Images are 64x64 px (the micro models' input size, so no resampling blurs small objects). Two families of image:

- *shapes*: 1-3 non-overlapping shapes (circle, square, triangle), each of a different shape and colour, 8, 12, 16
  or 20 px wide, on a plain white or light-grey background. Questions: the colour of the named shape, the shape of
  the named colour, left/right or top/bottom of the named colour (asked only of objects at least 8 px off the
  midline), and the count; all but the count depend on one object, often a small part of the image.
- *word*: one upper-case word from ``WORDS`` in PIL's default font at 16 px, in a random place and colour. The words
  come in pairs that differ in one letter (STOP / SHOP, HOTEL / MOTEL, ...), so reading one needs the patches of that
  letter, not any patch of the word.

Training and held-out draws never share an image: an image is *held out* when its pixels hash into one quarter
(``is_held_out``); the training split (``TRAIN_SEED``) draws only the other images, every other seed only held-out
ones. (The word images are few enough that independent draws overlapped: 36 of 40 textvqa-mini images of the first
version were also training images.)

Shapes and words start on the 8-px grid of the micro models' patches (``GRID``): at arbitrary sub-patch offsets a
from-scratch ViT did not learn to read the words at all within a CPU budget of minutes (measured: chance after 350
steps of a word-only probe, 100 % after 100 steps on the grid).

Answers are one lower-case word; counts are digits, which is what lmms-eval's EvalAI answer processor turns number
words into (``EvalAIAnswerProcessor.NUMBER_MAP``), so either form scores the same.
The distribution is fixed independently of any pruning strategy's results.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

IMAGE_SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((250, 250, 250), (205, 205, 205))
WORDS = ("stop", "shop", "open", "oven", "cafe", "cave", "exit", "edit", "bus", "bug", "hotel", "motel", "bank", "band",
         "park", "bark", "sale", "safe")
_INKS = ((10, 10, 10), (30, 60, 200), (190, 20, 20), (20, 110, 40))
_WORD_BACKGROUNDS = ((250, 250, 250), (205, 205, 205), (250, 230, 120))

SHAPE_KINDS = ("colour", "shape", "count", "position")
WORD_KINDS = ("word",)
KINDS = SHAPE_KINDS + WORD_KINDS

# Seeds of the splits: training draws from TRAIN_SEED only; the mini tasks and the tests use held-out seeds.
TRAIN_SEED = 0
MINI_SEED = 1000
TEST_SEED = 2000

FONT_SIZE = 16
GRID = 8  # words and shapes start on this pixel grid: the micro models' patch size
SIZES = (8, 12, 16, 20)  # object widths in px: half are at most 12 (one or two patches)
# Positions are asked only of objects whose centre is at least this far from the image's midline.
_MARGIN = 8


@dataclass
class Sample:
    image: object  # PIL.Image, RGB, IMAGE_SIZE square
    question: str
    answer: str
    kind: str
    #: (x0, y0, x1, y1) pixel boxes of what the answer depends on (the named object, every object, the word)
    boxes: list = field(default_factory=list)
    #: everything drawn: dicts with ``box`` and ``shape`` + ``colour``, or ``word`` + ``letters`` ((letter, box) each)
    objects: list = field(default_factory=list)


def is_held_out(image) -> bool:
    """Whether ``image`` belongs to the held-out quarter of the distribution (never drawn for training)."""
    return hashlib.sha256(image.tobytes()).digest()[0] % 4 == 0


def sample(rng: random.Random, kind: str, held_out: bool | None = None) -> Sample:
    """One sample of ``kind`` (one of ``KINDS``) drawn from ``rng``: of the held-out images (``True``), of the
    training images (``False``) or of either (``None``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}' (allowed: {', '.join(KINDS)})")
    while True:
        s = _word(rng) if kind == "word" else _shapes(rng, kind)
        if held_out is None or is_held_out(s.image) == held_out:
            return s


def _shapes(rng: random.Random, kind: str) -> Sample:
    while True:
        objects = _layout(rng, rng.randint(1, 3))
        if kind != "position":
            break
        # At least one object clearly off the midline along the axis the question asks about.
        axis = rng.randrange(2)
        candidates = [o for o in objects if abs(_centre(o["box"])[axis] - IMAGE_SIZE / 2) >= _MARGIN]
        if candidates:
            break
    image = _draw_shapes(rng, objects)
    if kind == "count":
        return Sample(image, "How many shapes are there?", str(len(objects)), kind, [o["box"] for o in objects], objects)
    if kind == "position":
        target = rng.choice(candidates)
        centre = _centre(target["box"])[axis]
        if axis == 0:
            question = f"Is the {target['colour']} shape on the left or the right?"
            answer = "left" if centre < IMAGE_SIZE / 2 else "right"
        else:
            question = f"Is the {target['colour']} shape at the top or the bottom?"
            answer = "top" if centre < IMAGE_SIZE / 2 else "bottom"
        return Sample(image, question, answer, kind, [target["box"]], objects)
    target = rng.choice(objects)
    if kind == "colour":
        return Sample(image, f"What color is the {target['shape']}?", target["colour"], kind, [target["box"]], objects)
    return Sample(image, f"What shape is the {target['colour']} object?", target["shape"], kind, [target["box"]], objects)


def draw_split(seed: int, n: int, kinds=KINDS) -> list[Sample]:
    """``n`` samples from ``seed``, kinds taken in turn (balanced); the same seed always gives the same samples.
    ``TRAIN_SEED`` draws training images only, any other seed held-out images only."""
    rng = random.Random(seed)
    return [sample(rng, kinds[i % len(kinds)], held_out=seed != TRAIN_SEED) for i in range(n)]


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _layout(rng: random.Random, count: int) -> list[dict]:
    """``count`` objects of distinct shapes and colours at non-overlapping boxes (2 px apart at least)."""
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    while True:
        boxes = []
        for _ in range(count):
            size = rng.choice(SIZES)
            cells = (IMAGE_SIZE - size) // GRID
            x0, y0 = GRID * rng.randint(0, cells), GRID * rng.randint(0, cells)
            boxes.append((x0, y0, x0 + size, y0 + size))
        if all(not _overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return [dict(shape=s, colour=c, box=b) for s, c, b in zip(shapes, colours, boxes)]


def _overlap(a, b, gap: int = 1) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _draw_shapes(rng: random.Random, objects: list[dict]):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return image


def font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _word(rng: random.Random) -> Sample:
    from PIL import Image, ImageDraw

    word = rng.choice(WORDS)
    text = word.upper()
    f = font()
    left, top, right, bottom = f.getbbox(text)
    width, height = right - left, bottom - top
    # On the patch grid: a from-scratch ViT reads a word at one sub-patch offset in minutes, at every offset it
    # would need far more data than a CPU trains on in minutes.
    x = GRID * rng.randint(0, (IMAGE_SIZE - width - 1) // GRID) + 1 - left
    y = GRID * rng.randint(0, (IMAGE_SIZE - height - 1) // GRID) + 1 - top
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(_WORD_BACKGROUNDS))
    ImageDraw.Draw(image).text((x, y), text, fill=rng.choice(_INKS), font=f)
    box = (x + left, y + top, x + right, y + bottom)
    letters = []
    for i, ch in enumerate(text):
        cl, ct, cr, cb = f.getbbox(ch)
        dx = x + round(f.getlength(text[:i]))
        letters.append((ch.lower(), (dx + cl, y + ct, dx + cr, y + cb)))
    return Sample(image, "what word is written?", word, "word", [box], [dict(word=word, box=box, letters=letters)])
