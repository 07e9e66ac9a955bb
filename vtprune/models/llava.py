"""LLaVA-1.5 (``LlavaForConditionalGeneration``): visual tokens pruned before the language model.

Pre-LLM strategies run here: the adapter computes the projector outputs itself, selects the kept tokens,
splices them with the text embeddings into a shorter sequence per sample (left padded again), and hands
``inputs_embeds`` to the model's own ``generate``. Position ids, attention mask and KV cache are therefore
those of the shorter sequence. ``none`` takes the model's own unmodified path, so that it is the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vtprune.errors import ConfigError
from vtprune.models.base import Adapter, PrunePlan, SampleRecord, left_pad_positions, register_family, sample_keys
from vtprune.strategies.base import Signals, sample_generators


@dataclass
class VisualTokens:
    """One batch's visual tokens as the LLM would see them, one entry per sample."""

    features: list[torch.Tensor]  # [N_b, D] projector outputs in the model's own order (layout included)
    groups: list[torch.Tensor]  # [N_b] crop / tile id of each token
    vision: object = None  # the vision tower's output, for signals that need it (family-specific)


@register_family
class LlavaAdapter(Adapter):
    """LLaVA-1.5 (LlavaForConditionalGeneration): visual tokens pruned before the language model."""

    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    model_types = ("llava",)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # -- visual tokens and signals -------------------------------------------------------------------------

    def visual_tokens(self, inputs) -> VisualTokens:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            output_hidden_states=True,
        )
        feats = list(out.pooler_output)
        groups = [torch.zeros(len(f), dtype=torch.long, device=f.device) for f in feats]
        return VisualTokens(feats, groups, out)

    def text_embeds(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM input embeddings of each prompt's text tokens after its image tokens, padded: ``[B, T, D]``, ``[B, T]``."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        embed = self.model.get_input_embeddings()
        rows = []
        for b in range(len(ids)):
            image_pos = torch.nonzero(ids[b] == self.image_token_id).flatten()
            start = int(image_pos[-1]) + 1 if len(image_pos) else 0
            rows.append(embed(ids[b, start:][mask[b, start:]]))
        return _pad_rows(rows)

    def signals(self, inputs, visual: VisualTokens, needs: tuple[str, ...]) -> Signals:
        valid = _pad_rows([torch.ones(len(f), dtype=torch.bool, device=f.device) for f in visual.features])[0]
        signals = Signals(valid=valid.bool())
        for name in needs:
            if name == "groups":
                signals.groups = _pad_rows(visual.groups, fill=-1)[0]
            elif name == "features":
                signals.features = _pad_rows(visual.features)[0]
            elif name == "text_embeds":
                signals.text_embeds, signals.text_valid = self.text_embeds(inputs)
            elif name == "cls_attention":
                signals.cls_attention = _pad_rows(self.cls_attention(inputs, visual))[0]
            else:
                raise ConfigError(f"pruning.strategy: model family '{self.family}' cannot provide the signal '{name}'")
        return signals

    def cls_attention(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """CLS→patch attention of the vision encoder per visual token, in the features' order."""
        raise ConfigError(f"pruning.strategy: model family '{self.family}' cannot provide the signal 'cls_attention' yet")

    # -- pruning before the LLM ----------------------------------------------------------------------------

    def pruned_inputs(self, inputs, plan: PrunePlan):
        """``inputs_embeds``, ``attention_mask`` of the shortened, re-left-padded sequences and the records."""
        start = time.perf_counter()
        visual = self.visual_tokens(inputs)
        signals = self.signals(inputs, visual, plan.strategy.needs)
        signals.generators = sample_generators(plan.seed, sample_keys(inputs))
        scoring = time.perf_counter() - start
        kept, selecting = plan.select(signals)
        per_sample = (scoring + selecting) / len(kept)

        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        embeds = self.model.get_input_embeddings()(ids)
        rows, records = [], []
        for b, keep in enumerate(kept):
            image_pos = torch.nonzero(ids[b] == self.image_token_id).flatten()
            feats = visual.features[b]
            if len(image_pos) != len(feats):
                raise ValueError(f"sample {b}: {len(image_pos)} image tokens in the prompt for {len(feats)} features")
            row = embeds[b].clone()
            row[image_pos] = feats.to(row.dtype)
            drop = torch.ones(len(feats), dtype=torch.bool, device=row.device)
            drop[keep.to(row.device)] = False
            stay = mask[b].clone()
            stay[image_pos[drop]] = False
            rows.append(row[stay])
            records.append(SampleRecord(kept=keep.tolist(), num_visual=len(feats), select_seconds=per_sample))
        inputs_embeds, attention_mask = _pad_rows(rows)
        return inputs_embeds, attention_mask.long(), records

    def generate(self, inputs, plan: PrunePlan, **gen):
        if plan.is_noop:
            out = self.model.generate(**inputs, **gen)
            return out[:, inputs["input_ids"].shape[1] :], self.unpruned_records(inputs)
        inputs_embeds, attention_mask, records = self.pruned_inputs(inputs, plan)
        out = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **gen)
        return out, records

    def prefill_logits(self, inputs, plan: PrunePlan):
        if plan.is_noop:
            positions = left_pad_positions(inputs["attention_mask"])
            logits = self.model(**inputs, position_ids=positions).logits[:, -1]
            return logits, self.unpruned_records(inputs)
        inputs_embeds, attention_mask, records = self.pruned_inputs(inputs, plan)
        positions = left_pad_positions(attention_mask)
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions).logits
        return logits[:, -1], records

    def unpruned_records(self, inputs) -> list[SampleRecord]:
        counts = (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        return [SampleRecord(kept=list(range(n)), num_visual=n) for n in counts]


def _pad_rows(rows: list[torch.Tensor], fill=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D or 2-D rows to one batch tensor; returns it and the mask of real entries."""
    length = max(len(r) for r in rows)
    batch = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), fill)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        if len(r):
            batch[b, length - len(r) :] = r
            mask[b, length - len(r) :] = True
    return batch, mask
