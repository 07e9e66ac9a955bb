"""LLaVA-1.5 (``LlavaForConditionalGeneration``): visual tokens pruned before or inside the language model.

Pre-LLM strategies: the adapter computes the projector outputs itself, selects the kept tokens, splices them
with the text embeddings into a shorter sequence per sample (left padded again), and hands ``inputs_embeds``
to the model's own ``generate``. Position ids, attention mask and KV cache are those of the shorter sequence.

In-LLM strategies (``fastv``): the model runs its own path; forward pre-hooks on the decoder layers, alive only
inside the call (``with self.applied(...)``), score the image tokens at layer K (1-based: ``layers[K-1]``) and
drop the pruned positions from the hidden states, rotary embeddings and mask of ``layers[K:]`` during prefill,
so those layers' KV cache holds only the kept tokens; decode steps get masks sized to each layer's own cache.

``none`` takes the model's own unmodified path, so that it is the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vtprune.errors import ConfigError
from vtprune.flops import encoder_layer_flops
from vtprune.merge import slot_features
from vtprune.models.base import Adapter, PrunePlan, SampleRecord, left_pad_positions, register_family, sample_keys
from vtprune.models.layout import TokenLayout, grid_boxes, to_image
from vtprune.strategies.base import Selection, Signals, budget, sample_generators


@dataclass
class VisualTokens:
    """One batch's visual tokens as the LLM would see them, one entry per sample."""

    features: list[torch.Tensor]  # [N_b, D] projector outputs in the model's own order (layout included)
    groups: list[torch.Tensor]  # [N_b] crop / tile id of each token
    vision: object = None  # the vision tower's output, for signals that need it (family-specific)


@dataclass
class _PreLLM:
    """What signal providers see before the LLM."""

    inputs: dict
    visual: VisualTokens


@dataclass
class _VisionLayer:
    """What signal providers see inside the vision tower: one layer's attention module and its normed input."""

    attn: torch.nn.Module
    x: torch.Tensor  # [crops, T, C] the layer's input after its first norm
    projected: dict = field(default_factory=dict)  # k_proj / v_proj outputs, each computed once

    def projection(self, name: str) -> torch.Tensor:
        """``[crops, T, H·d]`` the layer's ``name`` projection (``k_proj``, ``v_proj``) of its normed input."""
        if name not in self.projected:
            self.projected[name] = getattr(self.attn, name)(self.x)
        return self.projected[name]

    def heads(self, name: str) -> torch.Tensor:
        """``[crops, T, H, d]`` that projection split into heads."""
        crops, length, _ = self.x.shape
        return self.projection(name).view(crops, length, self.attn.num_heads, self.attn.head_dim)


@dataclass
class _VisionMerge:
    """Per-call state of a strategy placed inside the vision tower (ToMe)."""

    plan: PrunePlan
    counts: list[int]  # patches each crop keeps after each layer (or the final budget, every layer)
    origin: torch.Tensor | None = None  # [crops, T_now] each current token's index in the tower's input
    merged: torch.Tensor | None = None  # [crops, T_now] whether it carries a merge
    carry: torch.Tensor | None = None  # [crops, T_now] what the strategy carries from layer to layer
    length: int = 0  # tokens per crop entering the tower
    seconds: float = 0.0


@dataclass
class _Stage:
    """One in-LLM cut: from decoder layer ``layer`` (0-based, = the 1-based K) on, only this stage's tokens."""

    layer: int
    index: torch.Tensor | None = None  # [B, S_s] positions in the previous stage's sequence, left padded
    full_index: torch.Tensor | None = None  # [B, S_s] the same positions in the whole prompt
    ids: torch.Tensor | None = None  # [B, S_s] their token ids
    mask: torch.Tensor | None = None  # [B, S_s + new tokens] padding mask of this stage's layers
    rope: tuple | None = None
    position_ids: torch.Tensor | None = None
    visual: list[torch.Tensor] = field(default_factory=list)  # per sample: which of its visual tokens (sorted)
    #: per sample, the merges made entering this stage, in the previous stage's sequence: (anchor positions [M],
    #: source positions [N_b], weights [M, N_b]); the anchor's hidden state becomes the weighted mean of the sources'
    merges: list[tuple] = field(default_factory=list)


@dataclass
class _InLLMState:
    """Per-call state of the in-LLM hooks."""

    plan: PrunePlan
    stages: list[_Stage]
    keys: list[bytes]
    ids: torch.Tensor  # [B, S] the prompt
    mask: torch.Tensor  # [B, S] its padding mask
    remaining: list[torch.Tensor]  # per sample: indices into its visual tokens still in the sequence
    merged: list[set] = field(default_factory=list)  # per sample: which of them carry a merged token
    num_visual: torch.Tensor | None = None  # [B] each sample's visual tokens before any stage
    before: list[int] | None = None  # a strategy that also selects before the LLM: the tokens that stage left
    records: list[SampleRecord] = field(default_factory=list)
    decoding: bool = False
    select_seconds: float = 0.0
    projected: dict = field(default_factory=dict)  # the scored layer's own q_proj (last position) / k_proj outputs

    @property
    def gather(self) -> torch.Tensor | None:
        """The prompt positions the last stage's layers see, left padded."""
        return self.stages[-1].full_index


@dataclass
class _Layer:
    """What signal providers see inside the LLM: the decoder layer where a stage is scored, its input and layout."""

    state: _InLLMState
    layer: torch.nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple
    ids: torch.Tensor  # [B, S_now] token ids of the sequence the layer sees
    mask: torch.Tensor  # [B, S_now] its padding mask
    image_pos: list[torch.Tensor]  # [N_b] positions of each sample's visual tokens in it


@register_family
class LlavaAdapter(Adapter):
    """LLaVA-1.5 (LlavaForConditionalGeneration): visual tokens pruned before or inside the language model."""

    family = "llava"
    model_class = "LlavaForConditionalGeneration"
    model_types = ("llava",)
    tiny_text_layers = 4
    in_llm_signals = ("last_token_attention", "hidden_states", "text_hidden_states", "text_attention",
                      "text_attention_max", "visual_attention_max")
    vision_signals = ("vision_keys", "vision_layer_attention", "vision_semantic", "vision_values")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers

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
        return self.text_rows(ids, mask, self.model.get_input_embeddings()(ids))

    def text_rows(self, ids, mask, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vectors`` ``[B, S, D]`` over a sequence of ``ids`` at each one's text tokens after its image tokens,
        padded: ``[B, T, D]``, ``[B, T]``."""
        return _pad_rows([vectors[b, pos] for b, pos in enumerate(self.text_positions(ids, mask))])

    def text_positions(self, ids, mask) -> list[torch.Tensor]:
        """Each sample's positions of its text tokens after its image tokens (padding excluded)."""
        out = []
        for b in range(len(ids)):
            image_pos = torch.nonzero((ids[b] == self.image_token_id) & mask[b]).flatten()
            start = int(image_pos[-1]) + 1 if len(image_pos) else 0
            out.append(start + torch.nonzero(mask[b, start:]).flatten())
        return out

    def pre_projector(self, inputs, visual: VisualTokens):
        """Each sample's visual tokens before the projector (``[N_b, D_vision]``, in the features' order) and the
        projector, so that ``project(v) `` of a token's own ``v`` is its feature: merges before the projector."""
        return list(self.selected_vision_features(visual)), self.model.model.multi_modal_projector

    def selected_vision_features(self, visual: VisualTokens) -> torch.Tensor:
        """``[crops, P, D]`` the vision layer(s) the projector reads, as ``get_image_features`` selects them."""
        cfg = self.model.config
        layers = cfg.vision_feature_layer
        hidden = visual.vision.hidden_states
        chosen = hidden[layers] if isinstance(layers, int) else torch.cat([hidden[i] for i in layers], dim=-1)
        return chosen[:, 1:] if cfg.vision_feature_select_strategy == "default" else chosen

    def token_grid(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """``[N_b, 3]`` (group, row, column) of each visual token on its crop's patch grid; -1 for a token without a
        patch. LLaVA-1.5: one crop, row-major (strategy ``full`` puts the CLS token first)."""
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        out = []
        for f in visual.features:
            p = torch.arange(side * side, device=f.device)
            grid = torch.stack([torch.zeros_like(p), p // side, p % side], dim=1)
            if len(f) == len(p) + 1:
                grid = torch.cat([grid.new_full((1, 3), -1), grid])
            out.append(grid)
        return out

    def signals(self, inputs, visual: VisualTokens, needs: tuple[str, ...]) -> Signals:
        # Visual signals are right padded: index i of a row is visual token i of that sample.
        valid = _pad_right([torch.ones(len(f), dtype=torch.bool, device=f.device) for f in visual.features], False)
        return self.compute_signals(_PreLLM(inputs, visual), valid, needs)

    # Providers before the LLM get a _PreLLM context; last_token_attention runs in the in-LLM hook (_Layer).

    def signal_groups(self, ctx: _PreLLM, signals: Signals) -> None:
        signals.groups = _pad_right(ctx.visual.groups, -1)

    def signal_features(self, ctx: _PreLLM, signals: Signals) -> None:
        signals.features = _pad_right(ctx.visual.features, 0)

    def signal_text_embeds(self, ctx: _PreLLM, signals: Signals) -> None:
        signals.text_embeds, signals.text_valid = self.text_embeds(ctx.inputs)

    def signal_grid(self, ctx: _PreLLM, signals: Signals) -> None:
        signals.grid = _pad_right(self.token_grid(ctx.inputs, ctx.visual), -1)

    def signal_hidden_states(self, ctx: _Layer, signals: Signals) -> None:
        signals.hidden_states = _pad_right([ctx.hidden[b, pos] for b, pos in enumerate(ctx.image_pos)], 0)

    def signal_text_hidden_states(self, ctx: _Layer, signals: Signals) -> None:
        signals.text_hidden_states, signals.text_valid = self.text_rows(ctx.ids, ctx.mask, ctx.hidden)

    def signal_cls_attention(self, ctx: _PreLLM, signals: Signals) -> None:
        signals.cls_attention = _pad_right(self.cls_attention(ctx.inputs, ctx.visual), 0)

    def signal_vision_attention(self, ctx: _PreLLM, signals: Signals) -> None:
        maps = self.vision_attention(ctx.inputs, ctx.visual)  # [L, N_b] each: pad the token axis
        signals.vision_attention = _pad_right([m.T for m in maps], 0).transpose(1, 2)

    def signal_vision_cls_attention(self, ctx: _PreLLM, signals: Signals) -> None:
        maps = self.vision_attention(ctx.inputs, ctx.visual, cls_row=True)
        signals.vision_cls_attention = _pad_right([m.T for m in maps], 0).transpose(1, 2)

    def signal_text_attention(self, ctx: _Layer, signals: Signals) -> None:
        signals.text_attention = self._text_rows_attention(ctx, signals, "mean")

    def signal_text_attention_max(self, ctx: _Layer, signals: Signals) -> None:
        signals.text_attention_max = self._text_rows_attention(ctx, signals, "max")

    def signal_visual_attention_max(self, ctx: _Layer, signals: Signals) -> None:
        maps = rows_attention(ctx.layer, ctx.hidden, ctx.position_embeddings, ctx.mask, ctx.image_pos, ctx.image_pos,
                              "max")
        width = signals.valid.shape[1]
        padded = ctx.hidden.new_zeros(len(maps), width, width).float()
        for b, m in enumerate(maps):
            padded[b, : m.shape[0], : m.shape[1]] = m
        signals.visual_attention_max = padded

    def _text_rows_attention(self, ctx: _Layer, signals: Signals, reduce: str) -> torch.Tensor:
        """``[B, T, N]`` the text rows' attention to the visual tokens (heads reduced), text rows left padded as
        ``text_valid``, which it sets."""
        text_pos = self.text_positions(ctx.ids, ctx.mask)
        maps = rows_attention(ctx.layer, ctx.hidden, ctx.position_embeddings, ctx.mask, text_pos, ctx.image_pos, reduce)
        padded = ctx.hidden.new_zeros(len(maps), max(len(p) for p in text_pos), signals.valid.shape[1]).float()
        for b, m in enumerate(maps):
            padded[b, padded.shape[1] - m.shape[0] :, : m.shape[1]] = m
        signals.text_valid = _pad_rows([torch.ones(len(p), dtype=torch.bool, device=ctx.hidden.device)
                                        for p in text_pos])[0]
        return padded

    def signal_vision_keys(self, ctx: _VisionLayer, signals: Signals) -> None:
        signals.vision_keys = ctx.heads("k_proj").mean(dim=2)

    def signal_vision_layer_attention(self, ctx: _VisionLayer, signals: Signals) -> None:
        attn = ctx.attn
        signals.vision_layer_attention = first_row_attention(attn.q_proj(ctx.x[:, :1]), ctx.projection("k_proj"),
                                                             attn.num_heads, attn.head_dim, attn.scale)

    def signal_vision_semantic(self, ctx: _VisionLayer, signals: Signals) -> None:
        values = ctx.heads("v_proj").float()  # [crops, T, H, d]
        logits = torch.einsum("chd,cthd->cht", values[:, 0], values)  # the CLS value with every value, unscaled
        signals.vision_semantic = torch.softmax(logits, dim=-1).mean(dim=1)

    def signal_vision_values(self, ctx: _VisionLayer, signals: Signals) -> None:
        signals.vision_values = ctx.heads("v_proj").mean(dim=2)

    def signal_last_token_attention(self, ctx: _Layer, signals: Signals) -> None:
        head_scores = last_token_attention(ctx.layer, ctx.hidden, ctx.position_embeddings, ctx.mask, ctx.state.projected)
        rows = [head_scores[b][:, pos] for b, pos in enumerate(ctx.image_pos)]  # [H, N_b]
        padded = head_scores.new_zeros(len(rows), head_scores.shape[1], signals.valid.shape[1])
        for b, row in enumerate(rows):
            padded[b, :, : row.shape[1]] = row
        signals.last_token_attention = padded

    def feature_layer(self, vision_output) -> tuple[int, torch.Tensor]:
        """The vision encoder layer whose output the projector reads (its index) and that layer's input, for
        saliency recomputed inside it."""
        layer_index = self.model.config.vision_feature_layer
        if not isinstance(layer_index, int):
            raise ConfigError("pruning.strategy: cls_attention needs a single vision_feature_layer")
        hidden = vision_output.hidden_states  # embeddings, then the output of each encoder layer
        produced = layer_index % len(hidden)  # hidden[produced] is the output of encoder layer produced - 1
        if produced == 0:
            raise ConfigError("pruning.strategy: cls_attention needs features taken after an encoder layer")
        return produced - 1, hidden[produced - 1]

    def crop_cls_attention(self, vision_output) -> torch.Tensor:
        """``[crops, P]`` CLS→patch attention inside the vision layer producing the used features, head mean.

        Recomputed from that layer's ``layer_norm1``/``q_proj``/``k_proj`` so the tower keeps its fast attention.
        Column order is the features' order: the CLS column is dropped with the ``default`` select strategy.
        """
        cfg = self.model.config
        index, layer_input = self.feature_layer(vision_output)
        layer = _vision_layers(self.model.model.vision_tower)[index]
        attn = layer.self_attn
        x = layer.layer_norm1(layer_input)
        scores = first_row_attention(attn.q_proj(x[:, :1]), attn.k_proj(x), attn.num_heads, attn.head_dim, attn.scale)
        return scores[:, 1:] if cfg.vision_feature_select_strategy == "default" else scores

    def cls_attention(self, inputs, visual: VisualTokens) -> list[torch.Tensor]:
        """CLS→patch attention of the vision encoder per visual token, in the features' order."""
        return self.pack_saliency(inputs, self.crop_cls_attention(visual.vision))

    def pack_saliency(self, inputs, crop_map: torch.Tensor) -> list[torch.Tensor]:
        """A per-patch map ``[crops, P]`` of the tower's output as each sample's ``[N_b]`` map in the features'
        order: what every saliency signal goes through. LLaVA-1.5: one crop per sample, as it is."""
        return list(crop_map)

    def vision_layer_qk(self, index: int, layer_input: torch.Tensor):
        """``(q, k, heads, head_dim, scale)`` of vision encoder layer ``index`` on its input ``[crops, T, C]``: the
        projected queries and keys ``[crops, T, H·d]`` its attention computes (CLIP / SigLIP layout)."""
        attn = _vision_layers(self.model.model.vision_tower)[index].self_attn
        x = _vision_layers(self.model.model.vision_tower)[index].layer_norm1(layer_input)
        return attn.q_proj(x), attn.k_proj(x), attn.num_heads, attn.head_dim, attn.scale

    def crop_vision_attention(self, vision_output, cls_row: bool = False) -> torch.Tensor:
        """``[L, crops, P]`` attention each patch receives in vision layers 1..L (L: the layer producing the used
        features), head and query-row mean over the crop's every token (CLS included) — or, ``cls_row``, the CLS
        token's row alone — the CLS column dropped with the ``default`` select strategy. Recomputed from each
        layer's own norm and q/k projections on its captured input, one crop at a time, so that the tower keeps
        its fused attention."""
        index, _ = self.feature_layer(vision_output)
        hidden = vision_output.hidden_states  # hidden[i] is encoder layer i's input
        maps = []
        for i in range(index + 1):
            q, k, heads, head_dim, scale = self.vision_layer_qk(i, hidden[i])
            if cls_row:
                maps.append(first_row_attention(q[:, :1], k, heads, head_dim, scale))
            else:
                maps.append(torch.stack([received_attention(qc, kc, heads, head_dim, scale) for qc, kc in zip(q, k)]))
        out = torch.stack(maps)
        return out[..., 1:] if self.model.config.vision_feature_select_strategy == "default" else out

    def vision_attention(self, inputs, visual: VisualTokens, cls_row: bool = False) -> list[torch.Tensor]:
        """Each sample's ``[L, N_b]`` received (or CLS) attention per vision layer, packed like the features."""
        per_layer = [self.pack_saliency(inputs, layer_map)
                     for layer_map in self.crop_vision_attention(visual.vision, cls_row)]
        return [torch.stack(maps) for maps in zip(*per_layer)]

    # -- pruning before the LLM ----------------------------------------------------------------------------

    def pruned_inputs(self, inputs, plan: PrunePlan):
        """``inputs_embeds``, ``attention_mask`` of the shortened, re-left-padded sequences and the records."""
        spliced, records = self.spliced(inputs, plan)
        return spliced["inputs_embeds"], spliced["attention_mask"], records

    def spliced(self, inputs, plan: PrunePlan) -> tuple[dict, list[SampleRecord]]:
        """The model inputs of the shortened sequences (``inputs_embeds``, ``attention_mask``, ``position_ids``)
        and the records: the pre-LLM splice. Positions are the family's (``spliced_positions``)."""
        if plan.strategy.stage == "vision":  # the tower merged: its outputs are the survivors, in their slots
            visual, selections, seconds = self.merged_visual_tokens(inputs, plan)
            per_sample = seconds / len(selections)
        else:
            # The vision tower runs pruned or not: only scoring (signals) and selection count as pruning overhead.
            visual = self.visual_tokens(inputs)
            start = time.perf_counter()
            signals = self.signals(inputs, visual, self.needs_at(plan.strategy, "pre_llm"))
            signals.generators = sample_generators(plan.seed, sample_keys(inputs))
            scoring = time.perf_counter() - start
            selections, selecting = plan.select(signals)
            per_sample = (scoring + selecting) / len(selections)

        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        embeds = self.model.get_input_embeddings()(ids)
        merging = plan.strategy.stage != "vision" and any(s.num_merged for s in selections)
        # Fixed-resolution towers cannot resize their input: "input" merges are made just before the projector.
        before_projector = (self.pre_projector(inputs, visual) if merging and plan.strategy.merge_space in ("vision", "input")
                            else None)
        rows, stays, records = [], [], []
        for b, selection in enumerate(selections):
            image_pos = torch.nonzero(ids[b] == self.image_token_id).flatten()
            feats = visual.features[b]
            if len(image_pos) != len(feats):
                raise ValueError(f"sample {b}: {len(image_pos)} image tokens in the prompt for {len(feats)} features")
            # A merged token sits in its anchor's slot (and keeps the anchor's position).
            if merging:
                feats = slot_features(selection, feats, None if before_projector is None
                                      else (before_projector[0][b], before_projector[1]))
            row = embeds[b].clone()
            row[image_pos] = feats.to(row.dtype)
            keep = selection.slots
            stay = _without_pruned(mask[b], image_pos, keep)
            rows.append(row[stay])
            stays.append(stay)
            records.append(SampleRecord(kept=keep.tolist(), num_visual=len(feats), select_seconds=per_sample,
                                        merged=selection.anchors.tolist()))
        inputs_embeds, attention_mask = _pad_rows(rows)
        attention_mask = attention_mask.long()
        spliced = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                   "position_ids": self.spliced_positions(inputs, torch.stack(stays), attention_mask)}
        return spliced, records

    # -- selecting inside the vision tower (placement "vision": ToMe, FlowCut) ----------------------------

    def merged_visual_tokens(self, inputs, plan: PrunePlan):
        """``(visual, selections, seconds)``: the visual tokens of a tower whose layers up to the one the projector
        reads select (and merge) tokens between their attention and their MLP, or after the whole layer, as the
        strategy selects at each (its ``schedule`` says how many patches each layer leaves; without one, the final
        budget, and the strategy paces itself); the CLS token always stays. The feature layer's
        output is put back at full length, survivors in their own rows, so that the projector and the model's own
        feature selection run unchanged; each sample's selection names the survivors (``kept``) and those that
        carry merges (``anchors``, weights None: their vectors are the tower's). ``seconds``: keys and matching."""
        cfg = self.model.config
        layers = _vision_layers(self.model.model.vision_tower)
        index = self.feature_layer_index()
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        # each layer's count: the strategy's schedule, or the final budget (a strategy that decides its own pace)
        counts = (plan.strategy.schedule(patches, plan.keep_ratio, index + 1) if plan.strategy.schedule
                  else [budget(patches, plan.keep_ratio)] * (index + 1))
        # A strategy without a schedule decides each crop's count itself (FlowCut: from its attention's entropy):
        # crops may then leave different numbers of tokens, so each sample's image goes through the tower alone.
        parts = [slice(None)] if plan.strategy.schedule else [slice(b, b + 1) for b in range(len(inputs["input_ids"]))]
        visuals, selections, seconds = [], [], 0.0
        drop_cls = 1 if cfg.vision_feature_select_strategy == "default" else 0
        for part in parts:
            state = _VisionMerge(plan, counts)
            try:
                for i in range(index + 1):  # an instance attribute over the class's forward, for this call only
                    layers[i].forward = self._merging_forward(layers[i], state, i, last=i == index)
                visuals.append(self.visual_tokens({**inputs, "pixel_values": inputs["pixel_values"][part]}))
            finally:
                for i in range(index + 1):
                    vars(layers[i]).pop("forward", None)
            seconds += state.seconds
            for origin, merged in zip(state.origin, state.merged):
                stay = origin[origin >= drop_cls] - drop_cls
                carries = merged[origin >= drop_cls]
                selections.append(Selection(stay[~carries], stay[carries]))
        visual = visuals[0] if len(visuals) == 1 else VisualTokens(
            [f for v in visuals for f in v.features], [g for v in visuals for g in v.groups])
        return visual, selections, seconds

    def _merging_forward(self, layer, state: _VisionMerge, i: int, last: bool):
        """A CLIP encoder layer's forward that selects (and merges) tokens after its attention or after the whole
        layer, as the placement says (``_VisionMerge``)."""
        attn = layer.self_attn
        after_attention = self.placement(state.plan).after == "attention"

        def forward(hidden_states, attention_mask=None, **kwargs):
            crops, length, _ = hidden_states.shape
            if i == 0:
                state.length = length
                state.origin = torch.arange(length, device=hidden_states.device).expand(crops, -1)
                state.merged = torch.zeros(crops, length, dtype=torch.bool, device=hidden_states.device)
            x = layer.layer_norm1(hidden_states)
            out, _ = attn(hidden_states=x, attention_mask=attention_mask, **kwargs)
            hidden = hidden_states + out
            context = _VisionLayer(attn, x)
            if after_attention:
                hidden = self._vision_select(state, i, context, hidden)
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            if not after_attention:
                hidden = self._vision_select(state, i, context, hidden)
            if last:  # back to full length: the model's own feature selection and projector read it
                full = hidden.new_zeros(crops, state.length, hidden.shape[-1])
                full[torch.arange(crops)[:, None], state.origin] = hidden
                return full
            return hidden

        return forward

    def _vision_select(self, state: _VisionMerge, i: int, context: _VisionLayer, hidden: torch.Tensor) -> torch.Tensor:
        """The strategy's selection at vision layer ``i`` on each crop's current tokens, applied to ``hidden``."""
        crops, length, _ = hidden.shape
        strategy = state.plan.strategy
        start = time.perf_counter()
        valid = torch.ones(crops, length, dtype=torch.bool, device=hidden.device)
        valid[:, 0] = False  # the CLS token
        signals = self.compute_signals(context, valid, strategy.needs)
        signals.stage, signals.stages, signals.carry = i, len(state.counts), state.carry
        counts = torch.full((crops,), state.counts[i], dtype=torch.long)
        selections = strategy.selections(signals, state.plan.keep_ratio, counts, **state.plan.options)
        state.seconds += time.perf_counter() - start
        rows, origin, merged, carry = [], [], [], []
        for c, selection in enumerate(selections):
            keep = torch.cat([selection.slots.new_zeros(1), selection.slots.to(hidden.device)])
            rows.append(slot_features(selection, hidden[c])[keep])
            origin.append(state.origin[c][keep])
            merged.append(state.merged[c][keep] | torch.isin(keep, selection.anchors.to(hidden.device)))
            if selection.carry is not None:
                carry.append(selection.carry.to(hidden.device)[keep])
        state.origin, state.merged = torch.stack(origin), torch.stack(merged)
        state.carry = torch.stack(carry) if carry else None
        return torch.stack(rows)

    def feature_layer_index(self) -> int:
        """The 0-based vision encoder layer whose output the projector reads (from the config)."""
        cfg = self.model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ConfigError("pruning.strategy: merging inside the vision tower needs a single vision_feature_layer")
        return cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1

    def prompt_positions(self, inputs) -> torch.Tensor:
        """Position ids of the whole prompt, as the model computes them (``[B, S]``; M-RoPE families ``[3, B, S]``)."""
        return left_pad_positions(inputs["attention_mask"])

    def spliced_positions(self, inputs, stays: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions of the shortened sequences: LLaVA numbers them afresh (the shorter sequence is the prompt)."""
        return left_pad_positions(attention_mask)

    # -- pruning inside the LLM (fastv, pdrop) -------------------------------------------------------------

    def add_hooks(self, inputs, plan: PrunePlan, handles: list) -> _InLLMState:
        """In-LLM strategies: one forward pre-hook on every decoder layer from the one that scores the first stage.

        The pre-hook of layer ``i`` cuts the sequence if a stage starts at ``i`` (prefill) and gives the layer its
        stage's rotary embeddings and mask; a forward hook on the layer before each stage scores that layer's input
        (with the q/k projections the layer itself computed) and selects the stage's tokens among the current ones."""
        if plan.strategy.stage != "in_llm":
            return super().add_hooks(inputs, plan, handles)
        layers = self.decoder_layers
        stages = [_Stage(k) for k in self.placement(plan).layers]
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        state = _InLLMState(plan=plan, stages=stages, keys=sample_keys(inputs), ids=ids, mask=mask,
                            remaining=[torch.arange(int((row == self.image_token_id).sum()), device=ids.device) for row in ids],
                            merged=[set() for _ in ids])
        state.num_visual = torch.tensor([len(r) for r in state.remaining])
        before = inputs.get("before")  # records of the selection made before the LLM (``before_llm_inputs``)
        if before is not None:
            state.remaining = [torch.tensor(r.kept, dtype=torch.long, device=ids.device) for r in before]
            state.merged = [set(r.merged) for r in before]
            state.num_visual = torch.tensor([r.num_visual for r in before])
            state.before = [r.num_kept for r in before]
            state.select_seconds = sum(r.select_seconds for r in before)
        for index in range(stages[0].layer - 1, len(layers)):
            handles.append(layers[index].register_forward_pre_hook(self._in_llm_hook(state, index), with_kwargs=True))
        for stage in stages:
            scored = layers[stage.layer - 1]
            handles.append(scored.register_forward_hook(self._select_hook(state, stage), with_kwargs=True))
            if "last_token_attention" in plan.strategy.needs:
                # The layer's own q/k projections, so that scoring does not run k_proj over the sequence again.
                for name in ("q_proj", "k_proj"):
                    handles.append(getattr(scored.self_attn, name).register_forward_hook(self._capture(state, name)))
        return state

    @staticmethod
    def _capture(state: _InLLMState, name: str):
        def hook(module, args, output):
            if not state.decoding:
                state.projected[name] = output[:, -1:] if name == "q_proj" else output

        return hook

    def _select_hook(self, state: _InLLMState, upcoming: _Stage):
        """After the layer before ``upcoming`` ran (prefill): score its input and fix the next stage's tokens."""
        current = next((s for s in reversed(state.stages) if s.layer < upcoming.layer), None)

        def hook(layer, args, kwargs, output):
            if state.decoding:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self._select_stage(state, current, upcoming, layer, hidden, kwargs["position_embeddings"])
            state.projected.clear()

        return hook

    def _in_llm_hook(self, state: _InLLMState, index: int):
        from transformers.masking_utils import create_causal_mask

        starts = next((s for s in state.stages if s.layer == index), None)
        current = next((s for s in reversed(state.stages) if s.layer <= index), None)

        def hook(layer, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == state.stages[0].layer - 1:
                state.decoding = state.stages[0].index is not None  # the kept sets are fixed after prefill
            if starts is not None:
                if state.decoding:
                    starts.mask = torch.cat([starts.mask, starts.mask.new_ones(len(hidden), hidden.shape[1])], dim=1)
                else:
                    hidden = _merged(hidden, starts.merges)
                    hidden = _take(hidden, starts.index)
                    starts.rope = tuple(_take(t.expand(len(hidden), *t.shape[1:]), starts.full_index)
                                        for t in kwargs["position_embeddings"])
                    pos = kwargs.get("position_ids")
                    starts.position_ids = _take(pos.expand(len(hidden), -1), starts.full_index) if pos is not None else None
            if current is not None:
                if not state.decoding:
                    kwargs["position_embeddings"] = current.rope
                    if current.position_ids is not None:
                        kwargs["position_ids"] = current.position_ids
                kwargs["attention_mask"] = create_causal_mask(config=self.text_config, inputs_embeds=hidden,
                                                              attention_mask=current.mask, cache=kwargs.get("cache"),
                                                              layer_idx=index)
            return (hidden, *args[1:]), kwargs

        return hook

    def _select_stage(self, state: _InLLMState, current, upcoming: _Stage, layer, hidden, rope) -> None:
        """Score the input of ``layer`` (the sequence of stage ``current``, or the whole prompt) and fix ``upcoming``."""
        start = time.perf_counter()
        ids = state.ids if current is None else current.ids
        mask = state.mask if current is None else current.mask
        full_index = _left_pad_arange(mask) if current is None else current.full_index
        image_pos = [torch.nonzero((row == self.image_token_id) & m).flatten() for row, m in zip(ids, mask)]
        valid = _pad_right([torch.ones(len(p), dtype=torch.bool, device=hidden.device) for p in image_pos], False)
        context = _Layer(state, layer, hidden, rope, ids, mask, image_pos)
        signals = self.compute_signals(context, valid, self.needs_at(state.plan.strategy, "in_llm"),
                                       sample_generators(state.plan.seed, state.keys))
        signals.stage = state.stages.index(upcoming) + (state.before is not None)
        signals.stages = len(state.stages) + (state.before is not None)
        signals.num_visual = state.num_visual
        selections, _ = state.plan.select(signals)
        rows = []
        upcoming.merges = []
        for b, selection in enumerate(selections):
            # a merged token stays in its anchor's slot: the sequence keeps every slot, kept or merged
            slots = selection.slots.to(state.remaining[b].device)
            rows.append(torch.nonzero(_without_pruned(mask[b], image_pos[b], slots)).flatten())
            anchors = state.remaining[b][selection.anchors.to(slots.device)]
            state.remaining[b] = state.remaining[b][slots]
            state.merged[b] = (state.merged[b] | set(anchors.tolist())) & set(state.remaining[b].tolist())
            if selection.num_merged:
                weights = selection.weights[:, : len(image_pos[b])].to(hidden.device)
                upcoming.merges.append((image_pos[b][selection.anchors.to(hidden.device)], image_pos[b], weights))
            else:
                upcoming.merges.append(None)
        upcoming.index, upcoming.mask = _pad_rows(rows)
        upcoming.full_index, upcoming.ids = _take(full_index, upcoming.index), _take(ids, upcoming.index)
        state.select_seconds += time.perf_counter() - start
        upcoming.visual = [remaining.sort().values for remaining in state.remaining]
        if upcoming is state.stages[-1]:
            self._finish_records(state)

    def _finish_records(self, state: _InLLMState) -> None:
        total = len(self.decoder_layers)
        bounds = [s.layer for s in state.stages] + [total]
        for b, remaining in enumerate(state.remaining):
            n = int(state.num_visual[b])
            counts = [len(s.visual[b]) for s in state.stages]
            first = n if state.before is None else state.before[b]  # what the layers before the first cut see
            seen = bounds[0] * first + sum((end - s.layer) * c for s, end, c in zip(state.stages, bounds[1:], counts))
            counts = counts if state.before is None else [state.before[b], *counts]
            state.records.append(SampleRecord(kept=remaining.sort().values.tolist(), num_visual=n,
                                              select_seconds=state.select_seconds / len(state.remaining),
                                              equivalent_tokens=seen / total, stage_kept=counts,
                                              merged=sorted(state.merged[b])))

    # -- calls ---------------------------------------------------------------------------------------------

    def _generate(self, inputs, plan: PrunePlan, **gen):
        if plan.is_noop:
            out = self.model.generate(**inputs, **gen)
            return out[:, inputs["input_ids"].shape[1] :], self.unpruned_records(inputs)
        if plan.strategy.before_llm:
            spliced, hooked = self.before_llm_inputs(inputs, plan)
            with self.applied(hooked, plan) as state:
                out = self.model.generate(**spliced, **gen)
            return out, state.records
        if plan.strategy.stage == "in_llm":
            with self.applied(inputs, plan) as state:
                out = self.model.generate(**inputs, **gen)
            return out[:, inputs["input_ids"].shape[1] :], state.records
        spliced, records = self.spliced(inputs, plan)
        return self.model.generate(**spliced, **gen), records

    def _prefill_logits(self, inputs, plan: PrunePlan):
        if plan.strategy.before_llm:
            spliced, hooked = self.before_llm_inputs(inputs, plan)
            with self.applied(hooked, plan) as state:
                logits = self.model(**spliced).logits[:, -1]
            return logits, state.records
        if plan.is_noop or plan.strategy.stage == "in_llm":
            positions = self.prompt_positions(inputs)
            if plan.is_noop:
                return self.model(**inputs, position_ids=positions).logits[:, -1], self.unpruned_records(inputs)
            with self.applied(inputs, plan) as state:
                logits = self.model(**inputs, position_ids=positions).logits[:, -1]
            return logits, state.records
        spliced, records = self.spliced(inputs, plan)
        return self.model(**spliced).logits[:, -1], records

    def before_llm_inputs(self, inputs, plan: PrunePlan) -> tuple[dict, dict]:
        """A strategy that selects before the LLM and then inside it (VScan): the pre-LLM splice (its stage 0), and
        what the in-LLM hooks read instead of the prompt: the shortened sequence's token ids and mask, and the
        splice's records (the tokens left, in the original numbering)."""
        spliced, records = self.spliced(inputs, plan)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        rows = []
        for b, record in enumerate(records):
            image_pos = torch.nonzero(ids[b] == self.image_token_id).flatten()
            keep = torch.tensor(record.kept, dtype=torch.long, device=ids.device)
            rows.append(ids[b][_without_pruned(mask[b], image_pos, keep)])
        short_ids, short_mask = _pad_rows(rows, fill=self.model.config.get_text_config().pad_token_id or 0)
        return spliced, {"input_ids": short_ids, "attention_mask": short_mask.long(), "before": records}

    def unpruned_records(self, inputs) -> list[SampleRecord]:
        counts = (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        return [SampleRecord(kept=list(range(n)), num_visual=n) for n in counts]

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """LLaVA-1.5: one crop; patch tokens row-major; strategy 'full' keeps CLS first."""
        cfg = self.model.config
        patch = cfg.vision_config.patch_size
        view = to_image(inputs["pixel_values"][b], self.processor.image_processor)
        boxes = grid_boxes(0, 0, view.height // patch, view.width // patch, patch)
        if cfg.vision_feature_select_strategy == "full":
            boxes = [None, *boxes]
        return TokenLayout(view, boxes)

    # -- benchmarks ----------------------------------------------------------------------------------------

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        vision = hf_config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + (hf_config.vision_feature_select_strategy == "full")

    def num_synthetic_visual(self) -> int:
        """Visual tokens of one synthetic image."""
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (self.model.config.vision_feature_select_strategy == "full")

    def synthetic_pixels(self, batch_size: int, generator) -> dict:
        size = self.model.config.vision_config.image_size
        return {"pixel_values": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1}

    def synthetic_inputs(self, batch_size: int, prompt_tokens: int, generator: torch.Generator | None = None):
        """Random pixels, then the image tokens followed by ``prompt_tokens`` random text tokens (no tokenizer)."""
        cfg = self.model.config
        text = self.synthetic_words(batch_size, prompt_tokens, generator, cfg.image_token_id)
        image = torch.full((batch_size, self.num_synthetic_visual()), cfg.image_token_id)
        input_ids = torch.cat([image, text], dim=1)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **self.synthetic_pixels(batch_size, generator)}
        return self.on_model(inputs)

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """One crop through the CLIP ViT (patch embedding; patches + CLS through every encoder layer up to the one
        whose features are used: 23 of 24 with ``vision_feature_layer`` −2), then the projector MLP over the used
        tokens. transformers also runs the layers after that one, whose output nobody reads: the ideal skips them."""
        return cls._tower_flops(hf_config)

    @classmethod
    def merged_vision_flops(cls, hf_config, keep_ratio: float, schedule) -> int:
        """``vision_flops`` when a strategy placed inside the tower (ToMe) merges to ``keep_ratio``: each layer's
        attention runs on the tokens entering it, its MLP on those it leaves (``schedule``), the projector on the
        survivors."""
        return cls._tower_flops(hf_config, keep_ratio, schedule)

    @classmethod
    def _tower_flops(cls, hf_config, keep_ratio: float = 1.0, schedule=None) -> int:
        vision, hidden = hf_config.vision_config, hf_config.text_config.hidden_size
        patches = (vision.image_size // vision.patch_size) ** 2
        feature_layers = hf_config.vision_feature_layer
        feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        layers = max(i % (vision.num_hidden_layers + 1) for i in feature_layers)  # hidden_states[0] is the embedding
        left = schedule(patches, keep_ratio, layers) if schedule else [patches] * layers
        embed = 2 * patches * vision.num_channels * vision.patch_size**2 * vision.hidden_size
        tower = embed
        for entering, leaving in zip([patches, *left], left):  # + 1: the CLS token, never merged
            attention = encoder_layer_flops(entering + 1, vision.hidden_size, vision.intermediate_size, mlp_matrices=0)
            tower += attention + 2 * 2 * (leaving + 1) * vision.hidden_size * vision.intermediate_size
        used = left[-1] + (hf_config.vision_feature_select_strategy == "full")
        projector = 2 * used * (len(feature_layers) * vision.hidden_size * hidden + hidden * hidden)
        return tower + projector

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab, text=None, vision=None):
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        from vtprune.models.tiny import LLAVA_TEMPLATE, clip_vision, llama_text

        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vision = clip_vision(**(vision or {}))
        size, patch = vision["image_size"], vision["patch_size"]
        config = LlavaConfig(
            vision_config=vision, text_config=llama_text(vocab, tokenizer, cls.tiny_text_layers, **(text or {})),
            image_token_index=image_token_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2,
        )
        model = LlavaForConditionalGeneration(config).eval()
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
            chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
        )
        return model, processor


def first_row_attention(q: torch.Tensor, k: torch.Tensor, heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """``[B, L]`` attention of the first token (a vision tower's CLS) to every token, head mean, from that row's
    projected query ``[B, 1, H·d]`` and every projected key ``[B, L, H·d]``: one layer's scores recomputed, so that the
    tower keeps its fused attention (the HF adapters and vtprune's vLLM model alike)."""
    batch, length, _ = k.shape
    q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
    k = k.view(batch, length, heads, head_dim).transpose(1, 2)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, L]
    return probs.mean(dim=1)[:, 0]


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """``[T]`` attention each of one crop's ``T`` tokens receives, mean over heads and every query row, from the
    projected queries and keys ``[T, H·d]`` (softmax over the crop's tokens, in float32)."""
    length = k.shape[0]
    q = q.view(length, heads, head_dim).transpose(0, 1).float()
    k = k.view(length, heads, head_dim).transpose(0, 1).float()
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1).mean(dim=0).mean(dim=0)  # [H, T, T] → [T]


def last_token_attention(layer, hidden: torch.Tensor, position_embeddings, padding_mask: torch.Tensor,
                         projected: dict | None = None) -> torch.Tensor:
    """``[B, H, S]`` attention of the last position to every position in one Llama decoder layer, per query head.

    The eager formula over the layer's ``q_proj``/``k_proj`` outputs with rotary embeddings: ``projected`` holds
    those the layer computed itself (``q_proj`` at the last position, ``k_proj``); without it they are recomputed
    from ``input_layernorm``. The last position sees every non-padding key, so the padding mask is that row's mask.
    """
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    if projected and "q_proj" in projected and "k_proj" in projected:
        q, k = projected["q_proj"], projected["k_proj"]
    else:
        x = layer.input_layernorm(hidden)
        q, k = attn.q_proj(x[:, -1:]), attn.k_proj(x)
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = position_embeddings  # [B or 1, S, head_dim]
    heads, kv_heads = q.shape[-1] // attn.head_dim, k.shape[-1] // attn.head_dim
    rows = []
    for b in range(batch):  # one sample at a time: the whole batch's rotated keys never exist at once
        c, s = (cos[b], sin[b]) if len(cos) > 1 else (cos[0], sin[0])
        qb = q[b, -1].view(heads, attn.head_dim)
        qb = qb * c[-1] + rotate_half(qb) * s[-1]
        kb = k[b].view(length, kv_heads, attn.head_dim).transpose(0, 1)  # [KV, S, d]
        kb = kb * c + rotate_half(kb) * s
        # query head h reads key head h // (heads / kv_heads), as repeat_kv arranges them
        grouped = qb.view(kv_heads, heads // kv_heads, attn.head_dim)
        rows.append(torch.einsum("kgd,ksd->kgs", grouped.float(), kb.float()).reshape(heads, length))
    logits = torch.stack(rows) * attn.scaling  # [B, H, S]
    logits = logits.masked_fill(~padding_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def rows_attention(layer, hidden: torch.Tensor, position_embeddings, padding_mask: torch.Tensor,
                   rows_pos: list[torch.Tensor], image_pos: list[torch.Tensor], reduce: str = "mean") -> list[torch.Tensor]:
    """Per sample ``[R_b, N_b]``: the attention of each row (positions ``rows_pos``: the text after the image, or the
    visual tokens themselves) to each visual token (``image_pos``) in one Llama decoder layer, the mean or the max
    over heads: the eager causal formula over the layer's ``q_proj``/``k_proj`` with rotary embeddings, recomputed
    from ``input_layernorm`` on the layer's input (as ``last_token_attention``)."""
    from transformers.models.llama.modeling_llama import rotate_half

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    cos, sin = position_embeddings
    out = []
    for b in range(len(hidden)):  # one sample at a time, as last_token_attention
        c, s = (cos[b], sin[b]) if len(cos) > 1 else (cos[0], sin[0])
        rows = rows_pos[b]
        q, k = attn.q_proj(x[b, rows]), attn.k_proj(x[b])
        heads, kv_heads = q.shape[-1] // attn.head_dim, k.shape[-1] // attn.head_dim
        q = q.view(len(rows), heads, attn.head_dim).transpose(0, 1)
        q = q * c[rows] + rotate_half(q) * s[rows]
        k = k.view(-1, kv_heads, attn.head_dim).transpose(0, 1)
        k = k * c + rotate_half(k) * s
        grouped = q.reshape(kv_heads, heads // kv_heads, len(rows), attn.head_dim)
        logits = torch.einsum("kgtd,ksd->kgts", grouped.float(), k.float()).reshape(heads, len(rows), -1) * attn.scaling
        keys = torch.arange(logits.shape[-1], device=hidden.device)
        visible = padding_mask[b][None, :] & (keys[None, :] <= rows[:, None])  # [T, S]: causal, no padding
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        heads_reduced = probs.mean(dim=0) if reduce == "mean" else probs.max(dim=0).values
        out.append(heads_reduced[:, image_pos[b]])
    return out


def _merged(hidden: torch.Tensor, merges: list) -> torch.Tensor:
    """``hidden`` with each merge's anchor rows replaced by the weighted mean of its source rows (per sample)."""
    if not any(m is not None for m in merges):
        return hidden
    hidden = hidden.clone()
    for b, merge in enumerate(merges):
        if merge is not None:
            anchors, sources, weights = merge
            hidden[b, anchors] = (weights.to(hidden.dtype) @ hidden[b, sources]).to(hidden.dtype)
    return hidden


def _without_pruned(mask: torch.Tensor, image_pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A ``[S]`` padding mask with the image positions outside ``keep`` (indices into ``image_pos``) cleared."""
    drop = torch.ones(len(image_pos), dtype=torch.bool, device=mask.device)
    drop[keep.to(mask.device)] = False
    stay = mask.clone()
    stay[image_pos[drop]] = False
    return stay


def _left_pad_arange(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` the positions 0..S-1 of every row (a layout's index into itself)."""
    return torch.arange(mask.shape[1], device=mask.device).expand(len(mask), -1)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b]]`` for a ``[B, S, ...]`` tensor and ``[B, S']`` index."""
    return torch.stack([t[b, index[b]] for b in range(len(index))])


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


def _pad_right(rows: list[torch.Tensor], fill) -> torch.Tensor:
    """Right-pad rows so that index ``i`` of a row is visual token ``i`` of that sample."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def _vision_layers(tower):
    # CLIPVisionModel in transformers 5 holds the encoder directly; older layouts nest it in vision_model.
    return getattr(tower, "vision_model", tower).encoder.layers
