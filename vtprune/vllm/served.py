"""What vtprune's vLLM models share, whatever the family: the pruning plan of a request and its placeholders, the
processor fields that carry the plan and the prompt to the model, the strategy's signals and its selection.

Runs in vLLM's processes (it imports vLLM); ``vtprune.vllm`` is the side that does not.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems

from vtprune.merge import slot_features
from vtprune.strategies import Signals, budget
from vtprune.strategies.base import sample_generators
from vtprune.vllm import CONFIG_KEY, PLAN_KEY, PROMPT_KEY, image_tag, plan_key, prompt_ids

#: a file the model appends one JSON line per image to: its tag, kept slots and visual-token count (the engine
#: runs in another process; this is how the kept sets reach the caller)
KEPT_LOG = "VTPRUNE_VLLM_KEPT_LOG"
#: the processor's per-image fields: the prompt's text ids after the image, the seed key, the log tag, the plan
FIELDS = ("text_ids", "key", "tag", "plan")


def plan_of(hf_config, mm_kwargs=None) -> dict:
    """The request's pruning plan (``mm_kwargs[PLAN_KEY]``, a JSON object), else the engine's, else none."""
    given = (mm_kwargs or {}).get(PLAN_KEY)
    plan = json.loads(given) if given else getattr(hf_config, CONFIG_KEY, None) or {"strategy": "none"}
    return {"keep_ratio": 1.0, "options": {}, "seed": 0, **plan}


def slots_for(plan: dict, num_visual: int) -> int:
    """Placeholders of an image of ``num_visual`` tokens under ``plan``: the strategy's budget."""
    return num_visual if plan["strategy"] == "none" else budget(num_visual, float(plan["keep_ratio"]))


class PlanFields:
    """Mixin of a family's vLLM multimodal processor (before vLLM's own in the bases): takes vtprune's keys out of
    the HF processor's kwargs and hands the model, per image, the prompt's text ids after the image, the seed key of
    the HF engine (the digest of the whole expanded prompt), the log tag and the plan. They are part of vLLM's
    multimodal hash, so its processor and encoder caches never serve one request's selection to another.

    A family defines ``visual_tokens_of(width, height, hf_kwargs)``: an image's visual tokens before pruning."""

    def visual_tokens_of(self, width: int, height: int, hf_kwargs: dict) -> int:
        raise NotImplementedError

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        hf_kwargs = dict(hf_kwargs)
        prompt = hf_kwargs.pop(PROMPT_KEY, None)
        plan = plan_of(self.info.get_hf_config(), {PLAN_KEY: hf_kwargs.pop(PLAN_KEY, None)})
        out = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        images = mm_items.get_items("image", ImageProcessorItems) if "image" in mm_items else None
        if images is None or not len(images):
            return out
        image_token = self.info.get_hf_processor().image_token
        tokenizer = self.info.get_tokenizer()
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        encoded_plan = torch.frombuffer(bytearray(plan_key(plan).encode()), dtype=torch.uint8)
        text_ids, keys, tags = [], [], []
        for i in range(len(images)):
            size = images.get_image_size(i)
            n = self.visual_tokens_of(size.width, size.height, hf_kwargs)
            # Profiling runs send no prompt: an image token alone, with one text token so text scores are defined.
            ids = prompt_ids(tokenizer, prompt if prompt is not None else image_token + ".", image_token, n)
            image_pos = [j for j, t in enumerate(ids) if t == image_id]
            if len(image_pos) != n:
                raise ValueError(f"{PROMPT_KEY}: the prompt must hold exactly one image token '{image_token}' "
                                 f"({len(image_pos) // max(n, 1)} found)")
            key = np.asarray(ids, dtype=np.int64).tobytes()
            text_ids.append(torch.tensor(ids[image_pos[-1] + 1:], dtype=torch.long))
            keys.append(torch.frombuffer(bytearray(key), dtype=torch.uint8))
            tags.append(torch.tensor([image_tag(images.get(i), key)], dtype=torch.long))
        out.passthrough_data.update(vtprune_text_ids=text_ids, vtprune_key=keys, vtprune_tag=tags,
                                    vtprune_plan=[encoded_plan] * len(images))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return dict(
            super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            vtprune_text_ids=MultiModalFieldConfig.batched("image"),
            vtprune_key=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            vtprune_tag=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            vtprune_plan=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )


def pop_fields(kwargs: dict) -> dict:
    """vtprune's per-image fields out of ``embed_multimodal``'s kwargs (None where the processor set none: image
    embeddings given by the caller); the plans decoded."""
    fields = {name: kwargs.pop(f"vtprune_{name}", None) for name in FIELDS}
    if fields["plan"] is not None:
        fields["plan"] = [bytes(p.cpu().numpy().tobytes()).decode() for p in fields["plan"]]
    return fields


def planned_input(model, kwargs: dict):
    """``((fields, image_input), None)`` when a LLaVA-like vLLM ``model``'s batch came with plans and pixel values,
    else ``(None, embeddings)``: the model's own path (no image, or image embeddings given by the caller)."""
    fields = pop_fields(kwargs)
    image_input = model._parse_and_validate_image_input(**kwargs)
    if image_input is None:
        return None, []
    if fields["plan"] is None or image_input["type"] != "pixel_values":
        return None, model._process_image_input(image_input)
    return (fields, image_input), None


def plan_groups(plans: list[str]):
    """``(plan, indices)`` per distinct plan, in first-seen order: requests of several plans share a batch, and each
    plan's images are selected together."""
    for encoded in dict.fromkeys(plans):
        yield json.loads(encoded), [i for i, p in enumerate(plans) if p == encoded]


def _pad(rows: list[torch.Tensor], fill) -> torch.Tensor:
    # Right padding: index i of a row is visual token i of that image, as the HF adapters pad.
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def signals_for(strategy, plan: dict, features: list[torch.Tensor], grids: list[torch.Tensor], keys, text_ids,
                embed_text, cls_attention: list[torch.Tensor] | None = None,
                groups: list[torch.Tensor] | None = None) -> Signals:
    """The signals vtprune's vLLM models compute, for images of possibly different token counts: features, groups
    (given, else one per image), grid, CLS attention (when given), the prompt's text embeddings after the image
    (when the strategy needs them; ``embed_text`` is the LLM's input embedding) and each image's seeded generator."""
    device = features[0].device
    if groups is None:
        groups = [torch.zeros(len(f), dtype=torch.long, device=device) for f in features]
    signals = Signals(
        valid=_pad([torch.ones(len(f), dtype=torch.bool, device=device) for f in features], False),
        features=_pad(features, 0), groups=_pad([g.to(device) for g in groups], -1),
        grid=_pad(grids, -1), cls_attention=None if cls_attention is None else _pad(cls_attention, 0),
        generators=sample_generators(int(plan["seed"]), [bytes(k.cpu().numpy().tobytes()) for k in keys]),
    )
    if "text_embeds" in strategy.needs:
        text = _pad([t.to(device) for t in text_ids], 0)
        signals.text_valid = _pad([torch.ones(len(t), dtype=torch.bool, device=device) for t in text_ids], False)
        signals.text_embeds = embed_text(text) * signals.text_valid[..., None]
    return signals


def select(strategy, plan: dict, signals: Signals, features: list[torch.Tensor], tags,
           before_projector=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: its embeddings at the selection's slots (merges made, before the projector where the strategy
    merges there: ``before_projector = (vectors per image, project)``) and the slots; each selection is appended to
    the kept-set log (``KEPT_LOG``) when it is set."""
    selections = strategy.selections(signals, float(plan["keep_ratio"]), **plan["options"])
    merges_before = strategy.merge_space in ("vision", "input")
    out, log = [], []
    for b, selection in enumerate(selections):
        n = len(features[b])
        slots = selection.slots
        if len(slots) != slots_for(plan, n):
            raise ValueError(f"vtprune on vLLM: '{strategy.name}' kept {len(slots)} tokens where the prompt holds "
                             f"{slots_for(plan, n)} placeholders (budget({n}, {plan['keep_ratio']}))")
        feats = slot_features(selection, features[b], (before_projector[0][b], before_projector[1])
                              if merges_before else None)
        out.append((feats[slots.to(feats.device)], slots))
        log.append({"tag": int(tags[b].reshape(-1)[0]), "plan": plan, "kept": selection.kept.tolist(),
                    "merged": selection.anchors.tolist(), "num_visual": n})
    path = os.environ.get(KEPT_LOG)
    if path:
        with open(path, "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in log))
    return out
