"""Train a micro model of one family from scratch on the synthetic visual-QA distribution, on a CPU.

The shipped checkpoints (``vtprune/models/micro/<family>``) were made in two stages, 7 (llava), 12 (mllama) to 14-19
(qwen2_5_vl, llava_next) minutes each on 2 cores:

    python scripts/train_micro.py --family F --steps 1500 --batch 32 --lr 1e-3 --train-samples 12000 --threads 2
    python scripts/train_micro.py --family F --init vtprune/models/micro/F --steps 1500 --batch 32 --lr 1e-3 \
        --train-samples 12000 --threads 2 --seed 1 --kinds colour,shape,position,colour,shape,position,count,word

The second stage goes on from the first with more of the kinds that bind a question to one object (which the first
stage learns last). The micro model is the tiny model's architecture (``vtprune.models.tiny.build_model``: same
classes, tokenizer recipe and processor), larger, with a BPE corpus that covers the prompts and answers. Training
samples come from ``vtprune.eval.synth`` with ``TRAIN_SEED`` only; accuracy (teacher-forced, per kind) is printed on
a validation seed that is neither the mini tasks' nor the tests'. Each prompt is built exactly as vtprune builds it
at eval time: the lmms-eval task's prompt (question + the official post prompt) through the processor's chat
template (``Adapter.prepare``); the loss is on the answer tokens and EOS, plus an auxiliary per-patch probe on the
vision features (see ``main``). The checkpoint is saved in float16.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

from vtprune.eval import synth
from vtprune.models import FAMILIES as ADAPTERS
from vtprune.models.tiny import build_model

ROOT = Path(__file__).resolve().parents[1]
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # the mini tasks' (official) post prompt
VAL_SEED = 500

# Per family: sizes over the tiny recipe, and whether the answer follows the generation prompt after a space
# (LLaVA's "ASSISTANT:") or directly (a header that ends in a newline).
_LLAVA = dict(
    vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                image_size=synth.IMAGE_SIZE, patch_size=8, projection_dim=64, initializer_range=0.02),
    text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.02),
    space=True,
)
FAMILIES = {
    "llava": _LLAVA,
    # 64 px images as 2x2 tiles of 32 px (the tiny geometry): 4 x (16 patches + CLS) cross-attended tokens. The
    # vision tower is patch-local (see ``make_patch_local``).
    "mllama": dict(
        patch_local=True,
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_global_layers=1,
                    attention_heads=4, intermediate_layers_indices=[2], vision_output_dim=128,
                    initializer_range=0.02),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 3], initializer_range=0.02),
        space=False,
    ),
    # LLaVA-NeXT on the micro LLaVA sizes: a 64 px image takes the 64x128 pinpoint (base image + 2 crops, one of
    # padding that unpadding drops): 64 base + 64 crop tokens + 8 row newlines
    "llava_next": _LLAVA,
    # LLaVA-OneVision on the micro LLaVA-NeXT geometry (SigLIP for CLIP, Qwen2 for LLaMA, NeXT's pinpoints): a 64 px
    # image is the base view, then the two 64 px crops of the 64x128 pinpoint unpadded to 8x8 patches, with a newline
    # per grid row: 136 tokens. The grid is downsampled beyond one crop's worth of patches (anyres_max_1, the 7B
    # model's anyres_max_9 scaled to one-crop images): a 64x128 image's 16x8 patches to 11x5. (The tiny model's 32 px
    # crops split every object and see it whole only in a 4x4 overview: colour and shape questions stayed near
    # chance. A 64x64 pinpoint makes the one crop a copy of the base view: tied tokens that engines order apart.)
    "llava_onevision": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    image_size=synth.IMAGE_SIZE, patch_size=8),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.02),
        layout=dict(image_grid_pinpoints=[[64, 128], [128, 64], [128, 128]], vision_aspect_ratio="anyres_max_1"),
        space=True,
    ),
    # Qwen2.5-VL: 8 px patches merged 2x2, so a 64 px image gives 16 tokens of 16 px each
    "qwen2_5_vl": dict(
        vision=dict(depth=4, hidden_size=64, intermediate_size=256, num_heads=4, out_hidden_size=128,
                    initializer_range=0.02),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.02,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        space=False,
    ),
}


def patch_features(family, model, output, batch: int) -> torch.Tensor:
    """[B, G*G, D] the vision features the language model reads, per patch of the image, row-major."""
    if family in ("llava", "llava_next", "llava_onevision"):
        x = output.hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":  # CLIP's CLS first (OneVision's SigLIP: none)
            x = x[:, 1:]
        return x.reshape(batch, -1, *x.shape[1:])[:, 0]  # LLaVA-NeXT, -OneVision: the base image, the first crop
    if family == "qwen2_5_vl":  # merged tokens, row-major over the merged grid
        return output.pooler_output.reshape(batch, -1, output.pooler_output.shape[-1])
    # mllama: [B, 1 image, tiles, CLS + patches, D] with 2x2 tiles in row-major order
    x = output.last_hidden_state[:, 0, :, 1:]
    b, _, n, d = x.shape
    side = int(n**0.5)
    x = x.reshape(b, 2, 2, side, side, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 4 * n, d)


def set_layout(model, processor, image_grid_pinpoints: list, vision_aspect_ratio: str) -> None:
    """LLaVA-OneVision's anyres settings on a built model and its processor, in place of the tiny recipe's (both read
    them at run time and save them)."""
    model.config.image_grid_pinpoints = processor.image_processor.image_grid_pinpoints = image_grid_pinpoints
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = vision_aspect_ratio


def make_patch_local(model) -> None:
    """Zero and freeze every self-attention output projection of the Mllama vision tower (local and global layers).

    Mllama's tower attends across all tiles of an image in every layer, so a tower trained from scratch on 64 px
    images spreads the whole image into every token: a first micro model answered as well from the 4 CLS tokens
    alone, or from the complement of Trimmed Llama's kept set, as from all 68 (25/32 small-object questions each).
    Such a model cannot show a pruning mistake. Without the attention each token is its patch (or, for CLS, its
    tile's position) through the layers' MLPs, and finding the object is left to the language model's
    cross-attention, which is what Trimmed Llama scores. A deliberate difference from LLaMA-3.2-Vision, listed in
    the README (Micro models: known limits)."""
    vision = model.model.vision_model
    for layer in [*vision.transformer.layers, *vision.global_transformer.layers]:
        layer.self_attn.o_proj.weight.data.zero_()
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            proj.weight.requires_grad_(False)


def vision_module(family, model):
    name = {"mllama": "vision_model", "qwen2_5_vl": "visual"}.get(family, "vision_tower")
    return getattr(model.model, name)


def label_patch(model) -> int:
    """Pixels per visual token the auxiliary patch probe labels: a patch, or a merged token (Qwen2.5-VL's 2x2)."""
    vision = model.config.vision_config
    return vision.patch_size * getattr(vision, "spatial_merge_size", 1)


def feature_dim(family, model) -> int:
    vision = model.config.vision_config
    name = {"mllama": "vision_output_dim", "qwen2_5_vl": "out_hidden_size"}.get(family, "hidden_size")
    return getattr(vision, name)
# Training mixture: the word kind twice, since reading is the slower skill to learn.
TRAIN_KINDS = synth.SHAPE_KINDS + ("word", "word")


def prompt(s: synth.Sample) -> str:
    """The text the mini task's doc_to_text gives the model (textvqa capitalises its question)."""
    question = s.question.capitalize() if s.kind == "word" else s.question
    return question + POST_PROMPT


def corpus(space: bool = True) -> list[str]:
    """Every question, the post prompt and every answer (so that each is a few BPE tokens), plus chat words; answers
    also start a line where they follow the generation prompt without a space."""
    lines = ["USER: ASSISTANT: user assistant", POST_PROMPT.strip()]
    lines += [f"What color is the {s}? What shape is the {c} object?" for s in synth.SHAPES for c in synth.COLOURS]
    lines += [f"Is the {c} shape on the left or the right? Is the {c} shape at the top or the bottom?"
              for c in synth.COLOURS]
    lines += ["How many shapes are there? What word is written? what word is written?"]
    answers = [*synth.COLOURS, *synth.SHAPES, "1", "2", "3", "left", "right", "top", "bottom", *synth.WORDS]
    lines += [" ".join(answers), " ".join(" " + a for a in answers)]
    if not space:
        lines += answers
    return lines


# Auxiliary patch labels: background, each (shape, colour), each letter of the words (the pairs of words differ in
# one letter, so a per-word label would teach the tower nothing about the letter that tells them apart).
_LETTERS = sorted({ch for w in synth.WORDS for ch in w})
_PATCH_CLASSES = ["background"] + [f"{c} {s}" for s in synth.SHAPES for c in synth.COLOURS] + _LETTERS


def patch_labels(s: synth.Sample, patch: int) -> torch.Tensor:
    """[G*G] class of each patch (row-major): the shape or letter that covers most of it (at least 12 px²)."""
    grid = synth.IMAGE_SIZE // patch
    labels = torch.zeros(grid * grid, dtype=torch.long)
    parts = []
    for o in s.objects:
        parts += o["letters"] if "word" in o else [(f"{o['colour']} {o['shape']}", o["box"])]
    for r in range(grid):
        for c in range(grid):
            best = 12
            for name, (x0, y0, x1, y1) in parts:
                area = max(0, min(x1, (c + 1) * patch) - max(x0, c * patch)) * max(
                    0, min(y1, (r + 1) * patch) - max(y0, r * patch))
                if area >= best:
                    best = area
                    labels[r * grid + c] = _PATCH_CLASSES.index(name)
    return labels


def encode(processor, samples, space: bool, patch: int):
    """Per sample: the processor's inputs for its prompt (as ``Adapter.prepare`` builds them), the answer ids and the
    probe's labels of ``patch``-px cells."""
    tok = processor.tokenizer
    rows = []
    for s in samples:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt(s)}]}],
            add_generation_prompt=True,
        )
        inputs = processor(text=[text], images=[s.image], return_tensors="pt")
        answer = tok((" " if space else "") + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
        rows.append((inputs["input_ids"][0], inputs["pixel_values"], torch.tensor(answer), patch_labels(s, patch), extra))
    return rows


def collate(rows, pad_id: int):
    """Right-padded prompt + answer (positions then count from 0 as under left padding at eval), answer labels."""
    seqs = [torch.cat([ids, ans]) for ids, _, ans, _, _ in rows]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, ((ids, _, ans, _, _), seq) in enumerate(zip(rows, seqs)):
        input_ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
        # logits at position t predict token t+1: the model's own shift, labels at the answer positions
        labels[b, len(ids) : len(seq)] = ans
    out = dict(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat([r[1] for r in rows]), labels=labels)
    for key in rows[0][4]:
        if key == "cross_attention_mask":  # [1, S, images, tiles]: answer tokens see the image as the last prompt token
            cam = torch.zeros((len(rows), length, *rows[0][4][key].shape[2:]), dtype=rows[0][4][key].dtype)
            for b, (ids, _, ans, _, extra) in enumerate(rows):
                cam[b, : len(ids)] = extra[key][0]
                cam[b, len(ids) : len(ids) + len(ans)] = extra[key][0, -1]
            out[key] = cam
        elif rows[0][4][key].dim() == 2 and rows[0][4][key].shape[1] == len(rows[0][0]):  # per token (Qwen's types)
            per_token = torch.zeros((len(rows), length), dtype=rows[0][4][key].dtype)
            for b, (ids, _, _, _, extra) in enumerate(rows):
                per_token[b, : len(ids)] = extra[key][0]
            out[key] = per_token
        else:
            out[key] = torch.cat([r[4][key] for r in rows])
    return out


@torch.no_grad()
def accuracy(model, rows, samples, pad_id: int, batch: int = 64) -> dict[str, float]:
    """Teacher-forced exact answer (every answer token and EOS argmax-right), per kind: a cheap greedy proxy."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        inputs = collate(chunk, pad_id)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1]
        target = labels[:, 1:]
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(-1)
        for s, o in zip(samples[start : start + batch], ok.tolist()):
            hits.setdefault(s.kind, []).append(int(o))
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--init", type=Path, default=None, help="start from this saved micro checkpoint")
    parser.add_argument("--kinds", default=",".join(TRAIN_KINDS), help="training mixture (for experiments)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = FAMILIES[args.family]
    out = args.out or ROOT / "vtprune" / "models" / "micro" / args.family
    start = time.perf_counter()

    if args.init:  # a second stage: go on training a saved micro checkpoint (weights, tokenizer and processor)
        import transformers
        from transformers import AutoConfig

        from vtprune.models import resolve_family

        # the family's own class and processor loader (Qwen2.5-VL's drops the video processor, which needs torchvision)
        adapter = resolve_family(AutoConfig.from_pretrained(args.init).model_type, args.family)
        processor = adapter.load_processor(args.init)
        model = getattr(transformers, adapter.model_class).from_pretrained(args.init, dtype=torch.float32)
    else:
        model, processor = build_model(
            args.family, corpus=corpus(spec["space"]), vocab_size=512, seed=args.seed, text=spec["text"],
            vision=spec["vision"],
        )
        if spec.get("layout"):
            set_layout(model, processor, **spec["layout"])
    if spec.get("patch_local"):
        make_patch_local(model)
    pad_id = processor.tokenizer.pad_token_id
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    train = synth.draw_split(synth.TRAIN_SEED, args.train_samples, tuple(args.kinds.split(",")))
    val = synth.draw_split(VAL_SEED, 300, synth.KINDS)
    patch = label_patch(model)
    train_rows, val_rows = encode(processor, train, spec["space"], patch), encode(processor, val, spec["space"], patch)
    print(f"data: {len(train_rows)} training / {len(val_rows)} validation samples, "
          f"prompt {len(train_rows[0][0])} tokens, {time.perf_counter() - start:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    order = random.Random(args.seed)
    # The vision tower is trained from scratch: an auxiliary linear probe on the features LLaVA reads
    # (vision_feature_layer) learns what each patch shows, so that the features are useful before the language
    # model has learnt where to look (a stand-in for CLIP's pretraining; the probe is not saved).
    probe = torch.nn.Linear(feature_dim(args.family, model), len(_PATCH_CLASSES))
    captured = {}

    def grab(module, inputs, output):
        if model.training:  # not in the validation passes
            captured["patches"] = patch_features(args.family, model, output, captured["batch"])

    vision_module(args.family, model).register_forward_hook(grab)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*trained, *probe.parameters()], lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, min(100, args.steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))
    )
    model.train()
    indices: list[int] = []
    running = None
    for step in range(1, args.steps + 1):
        if len(indices) < args.batch:
            fresh = list(range(len(train_rows)))
            order.shuffle(fresh)
            indices += fresh
        batch = [train_rows[i] for i in indices[: args.batch]]
        del indices[: args.batch]
        captured["batch"] = len(batch)
        answer_loss = model(**collate(batch, pad_id)).loss
        targets = torch.stack([r[3] for r in batch])
        aux = torch.nn.functional.cross_entropy(probe(captured["patches"]).flatten(0, 1), targets.flatten())
        loss = answer_loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        now = torch.tensor([answer_loss.item(), aux.item()])
        running = now if running is None else 0.95 * running + 0.05 * now
        if step % 50 == 0 or step == args.steps:
            line = f"step {step}: answer loss {running[0]:.3f}, patch loss {running[1]:.3f}, {time.perf_counter() - start:.0f}s"
            if step % 250 == 0 or step == args.steps:
                acc = accuracy(model, val_rows, val, pad_id)
                line += "  val " + " ".join(f"{k} {v:.2f}" for k, v in acc.items())
            print(line, flush=True)

    model.eval()
    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    ADAPTERS.get(args.family).write_serving_files(out)  # what vLLM needs beside the checkpoint
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"saved {out} ({size:.1f} MB) in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
