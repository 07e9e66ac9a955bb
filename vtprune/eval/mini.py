"""Offline mirrors of textvqa_val, vqav2_val and llava_in_the_wild: generated images, official columns.

The textvqa and vqav2 mirrors are held-out draws of the synthetic visual-QA distribution the micro models are
trained on (``vtprune.eval.synth``, seeds ``MINI_SEED`` and ``MINI_SEED + 1``, held-out images only; training uses
``TRAIN_SEED`` and never draws them):
word questions for textvqa, colour / shape / count / position questions for vqav2. The llava_in_the_wild mirror
is drawn from a fixed table. Everything is drawn with PIL in code (no binaries in git), saved once with
``datasets`` under ``$VTPRUNE_CACHE/mini/`` and read by the task YAMLs in ``vtprune/eval/tasks/`` through
lmms-eval's ``load_from_disk`` path, with the official tasks' own prompt and scoring functions.
"""

from __future__ import annotations

from pathlib import Path

MINI_VERSION = "v3"  # bump when the tables or the drawing change, so stale caches are not reused

# name of the task -> (dataset folder, split the official task reads)
MINI_TASKS = {
    "vtprune_textvqa_mini": ("textvqa", "validation"),
    "vtprune_vqav2_mini": ("vqav2", "validation"),
    "vtprune_llava_bench_mini": ("llava_bench", "train"),
}

_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20),
            "black": (10, 10, 10), "white": (250, 250, 250)}

# Samples per task: a 13-point sweep over both tasks stays around two minutes on a 2-core CPU with a micro model.
MINI_SIZES = {"vtprune_vqav2_mini": 48, "vtprune_textvqa_mini": 40}

# (shape, colour, count, background)
_SHAPES = [("circle", "red", 1, "white"), ("square", "blue", 2, "white"), ("triangle", "green", 3, "black"),
           ("circle", "yellow", 2, "blue"), ("square", "red", 4, "white"), ("triangle", "blue", 1, "yellow")]
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def mini_dataset_path(task: str) -> Path:
    """Folder of the saved ``DatasetDict`` of a mini task, built on first use."""
    from vtprune.models.tiny import cache_root, cached

    folder, _ = MINI_TASKS[task]
    return cached(cache_root() / "mini" / f"{folder}-{MINI_VERSION}", lambda out: _build(task, out), task)


def _build(task: str, out: Path) -> None:
    import datasets
    from datasets.utils import logging as datasets_logging

    folder, split = MINI_TASKS[task]
    rows, features = {"textvqa": _textvqa, "vqav2": _vqav2, "llava_bench": _llava_bench}[folder]()
    data = datasets.DatasetDict({split: datasets.Dataset.from_list(rows, features=datasets.Features(features))})
    bars = datasets_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # for this save only: the user's setting is restored below
    try:
        data.save_to_disk(str(out))
    finally:
        if bars:
            datasets.enable_progress_bars()


def _shapes_image(shape: str, colour: str, count: int, background: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (336, 252), _COLOURS[background])
    draw = ImageDraw.Draw(image)
    for k in range(count):
        x0, y0 = 24 + 78 * k, 90
        box = (x0, y0, x0 + 64, y0 + 64)
        fill = _COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + 32, y0), (x0, y0 + 64), (x0 + 64, y0 + 64)], fill=fill)
    return image


def _textvqa():
    from datasets import Image, Sequence, Value

    from vtprune.eval import synth

    rows = []
    for i, s in enumerate(synth.draw_split(synth.MINI_SEED + 1, MINI_SIZES["vtprune_textvqa_mini"], synth.WORD_KINDS)):
        rows.append({
            "image_id": f"mini{i:04d}", "question_id": 90000 + i, "question": s.question,
            "question_tokens": s.question.rstrip("?").split(), "image": s.image,
            "image_width": s.image.width, "image_height": s.image.height, "answers": [s.answer] * 10,
            "image_classes": ["Sign"], "set_name": "val", "ocr_tokens": [s.answer],
        })
    features = {
        "image_id": Value("string"), "question_id": Value("int64"), "question": Value("string"),
        "question_tokens": Sequence(Value("string")), "image": Image(), "image_width": Value("int64"),
        "image_height": Value("int64"), "answers": Sequence(Value("string")),
        "image_classes": Sequence(Value("string")),
        "set_name": Value("string"), "ocr_tokens": Sequence(Value("string")),
    }
    return rows, features


# VQAv2's question_type / answer_type of each synthetic kind
_VQA_TYPES = {"colour": ("what color is the", "other"), "shape": ("what", "other"), "count": ("how many", "number"),
              "position": ("is the", "other")}


def _vqav2():
    from datasets import Image, Value

    from vtprune.eval import synth

    rows = []
    for i, s in enumerate(synth.draw_split(synth.MINI_SEED, MINI_SIZES["vtprune_vqav2_mini"], synth.SHAPE_KINDS)):
        qtype, kind = _VQA_TYPES[s.kind]
        rows.append({
            "question_type": qtype, "multiple_choice_answer": s.answer,
            "answers": [{"answer": s.answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            "image_id": 80000 + i, "answer_type": kind, "question_id": 800000 + i, "question": s.question,
            "image": s.image,
        })
    features = {
        "question_type": Value("string"), "multiple_choice_answer": Value("string"),
        "answers": [{"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}],
        "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
        "question": Value("string"), "image": Image(),
    }
    return rows, features


def _llava_bench():
    from datasets import Image, Value

    categories = ("conv", "detail", "complex")
    rows = []
    for i, (shape, colour, count, background) in enumerate(_SHAPES):
        category = categories[i % 3]
        noun = f"{_NUMBER_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"
        question = {
            "conv": "What color are the shapes in the image?",
            "detail": "Describe the image in detail.",
            "complex": "What could these shapes be used to teach?",
        }[category]
        answer = {
            "conv": f"The shapes are {colour}.",
            "detail": f"The image shows {noun} in a row on a {background} background.",
            "complex": f"With {noun} on a plain background, the picture could teach colors, shapes and counting.",
        }[category]
        rows.append({
            "question_id": i, "question": question, "image": _shapes_image(shape, colour, count, background),
            "caption": f"{noun} on a {background} background", "gpt_answer": answer, "category": category,
            "image_id": f"mini_{i:03d}.png",
        })
    features = {
        "question_id": Value("int64"), "question": Value("string"), "image": Image(), "caption": Value("string"),
        "gpt_answer": Value("string"), "category": Value("string"), "image_id": Value("string"),
    }
    return rows, features
