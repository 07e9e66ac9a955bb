"""LLaMA-3.2-Vision (``MllamaForConditionalGeneration``): visual tokens pruned between cross-attention layers.

Every pruning strategy on this family (``trimmed_llama``, ``random``, ``uniform``, ``cls_saliency``, ``fastervlm``,
``hired``) prunes at one point, so that comparisons differ only in the selection signal: during prefill the first cross-attention
layer sees every visual token; a forward pre-hook on it computes the strategy's signals and selects the kept
set; every later cross-attention layer then receives only the kept features (each sample's set padded to the
batch maximum, pad columns masked in its cross-attention mask), so its K/V projections, attention and KV cache
cover only the kept tokens. With the placement setting ``prune_first_layer_cache`` (default true, for every
strategy) the first layer's cached K/V are cut to the kept set right after prefill, so its decode steps
see only kept tokens too. Decode steps reuse the kept set. ``none`` runs the model's own untouched path.

Hooks live only inside one adapter call (``with self.applied(...)``) and are removed on exit. The cache cut
assumes a dynamic cache (``cache.layers[i].keys/values`` replaced), which is what ``generate`` uses by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from vtprune.flops import encoder_layer_flops
from vtprune.models.base import Adapter, PrunePlan, SampleRecord, left_pad_positions, register_family, sample_keys
from vtprune.models.layout import Box, TokenLayout, grid_boxes, to_image
from vtprune.strategies.base import Signals, sample_generators


@dataclass
class _TrimState:
    """Per-call state of the hooks."""

    plan: PrunePlan
    valid: torch.Tensor  # [B, N] bool: visual tokens of real tiles
    text_mask: torch.Tensor  # [B, S] bool: prompt positions that are not left padding
    keys: list[bytes]
    cut_first: bool
    first_pruned: bool = False  # placement prune_first_layer: the first cross layer sees only the kept tokens
    vision_input: torch.Tensor | None = None  # input of the vision layer scored by cls_attention
    gather: torch.Tensor | None = None  # [B, K] kept token indices, padded to the batch maximum
    gather_valid: torch.Tensor | None = None  # [B, K] False on pad columns
    first_cut: bool = False
    records: list[SampleRecord] = field(default_factory=list)


@dataclass
class _FirstCross:
    """What signal providers see: the first cross-attention layer and its prefill inputs."""

    state: _TrimState
    layer: torch.nn.Module
    hidden: torch.Tensor
    kwargs: dict


@register_family
class MllamaAdapter(Adapter):
    """LLaMA-3.2-Vision (MllamaForConditionalGeneration): visual tokens pruned after the first cross-attention layer."""

    family = "mllama"
    model_class = "MllamaForConditionalGeneration"
    model_types = ("mllama",)
    tiny_text_layers = 5
    tiny_token_names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    cross_attention = True
    prunes_at = "after the 1st cross-attention layer"

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def cross_layers(self) -> list[int]:
        return list(self.text_config.cross_attention_layers)

    @property
    def decoder_layers(self):
        return self.model.model.language_model.layers

    @property
    def tokens_per_tile(self) -> int:
        return self.model.model.vision_model.num_patches  # patches + CLS

    def _images_arg(self, images):
        return [[image] for image in images]  # one image per sample

    def visual_tokens_for_size(self, height: int, width: int) -> int:
        """Real tiles × tokens per tile: the tiled canvas transformers' processor picks for this size (its processor
        has no token count of its own)."""
        from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

        processor = self.processor.image_processor
        tile = processor.size["height"]
        canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, processor.max_image_tiles, tile)
        return (canvas_h // tile) * (canvas_w // tile) * self.tokens_per_tile

    # -- signals -------------------------------------------------------------------------------------------

    def visual_valid(self, inputs) -> torch.Tensor:
        """``[B, N]`` True for visual tokens of real tiles; a tile is real if some text row may attend to it."""
        tiles = inputs["cross_attention_mask"].bool().any(dim=1)[:, 0]  # [B, tiles] (one image per sample)
        return tiles.repeat_interleave(self.tokens_per_tile, dim=1)

    def signals(self, state: _TrimState, layer, hidden, kwargs) -> Signals:
        generators = sample_generators(state.plan.seed, state.keys)
        return self.compute_signals(_FirstCross(state, layer, hidden, kwargs), state.valid, state.plan.strategy.needs,
                                    generators)

    # Providers run in the first cross-attention layer's pre-hook, during prefill (_FirstCross).

    def signal_cross_attention(self, ctx: _FirstCross, signals: Signals) -> None:
        rows = ctx.state.text_mask.clone()
        if ctx.kwargs.get("full_text_row_masked_out_mask") is not None:
            rows &= ctx.kwargs["full_text_row_masked_out_mask"][:, 0, :, 0].bool()
        states = _per_sample(ctx.kwargs["cross_attention_states"], len(ctx.hidden))
        signals.cross_attention = cross_attention_scores(ctx.layer, ctx.hidden, states, rows, signals.valid)

    def signal_groups(self, ctx: _FirstCross, signals: Signals) -> None:
        valid = signals.valid
        tiles = torch.arange(valid.shape[1], device=valid.device) // self.tokens_per_tile
        signals.groups = tiles.expand_as(valid).masked_fill(~valid, -1)

    def signal_cls_attention(self, ctx: _FirstCross, signals: Signals) -> None:
        vision = self.model.model.vision_model
        scores = tile_cls_attention(vision.global_transformer.layers[-1], ctx.state.vision_input, self.tokens_per_tile)
        signals.cls_attention = scores.reshape(len(signals.valid), -1)

    # -- hooks ---------------------------------------------------------------------------------------------

    def add_hooks(self, inputs, plan: PrunePlan, handles: list) -> _TrimState:
        """Selection and cache cut on the first cross-attention layer, kept features for the later ones."""
        placement = self.placement(plan)
        state = _TrimState(
            plan=plan,
            valid=self.visual_valid(inputs),
            text_mask=inputs["attention_mask"].bool(),
            keys=sample_keys(inputs),
            cut_first=not plan.is_noop and placement.prune_first_layer_cache,
            first_pruned=not plan.is_noop and placement.prune_first_layer,
        )
        first, *later = self.cross_layers
        layers = self.decoder_layers
        handles.append(layers[first].register_forward_pre_hook(self._select_hook(state), with_kwargs=True))
        handles.append(layers[first].register_forward_hook(self._cut_cache_hook(state, first), with_kwargs=True))
        for i in later:
            handles.append(layers[i].register_forward_pre_hook(self._later_hook(state), with_kwargs=True))
        if "cls_attention" in plan.strategy.needs:
            scored = self.model.model.vision_model.global_transformer.layers[-1]
            handles.append(scored.register_forward_pre_hook(self._vision_hook(state), with_kwargs=True))
        return state

    def _vision_hook(self, state: _TrimState):
        def hook(module, args, kwargs):
            state.vision_input = args[0] if args else kwargs["hidden_states"]

        return hook

    def _select_hook(self, state: _TrimState):
        def hook(layer, args, kwargs):
            if kwargs.get("cross_attention_states") is None:  # decode step: the layer reads its cache
                if state.first_cut or state.first_pruned:
                    kwargs["cross_attention_mask"] = _take_columns(kwargs["cross_attention_mask"], state)
                    return args, kwargs
                return None
            start = time.perf_counter()
            hidden = args[0] if args else kwargs["hidden_states"]
            kept, _ = state.plan.select_kept(self.signals(state, layer, hidden, kwargs), "at the cross-attention layers")
            device = state.valid.device
            width = max(len(k) for k in kept)
            state.gather = torch.zeros(len(kept), width, dtype=torch.long, device=device)
            state.gather_valid = torch.zeros(len(kept), width, dtype=torch.bool, device=device)
            seconds = (time.perf_counter() - start) / len(kept)
            layers, full = len(self.cross_layers), 0 if state.first_pruned else 1  # full: cross layers that see all N
            for b, keep in enumerate(kept):
                state.gather[b, : len(keep)] = keep.to(device)
                state.gather_valid[b, : len(keep)] = True
                n = int(state.valid[b].sum())
                state.records.append(
                    SampleRecord(
                        kept=keep.tolist(),
                        num_visual=n,
                        select_seconds=seconds,
                        equivalent_tokens=(full * n + (layers - full) * len(keep)) / layers,
                    )
                )
            if state.first_pruned:  # this layer, too, projects, attends to and caches only the kept features
                return self._later_hook(state)(layer, args, kwargs)
            return None

        return hook

    def _cut_cache_hook(self, state: _TrimState, index: int):
        def hook(layer, args, kwargs, output):
            cache = kwargs.get("cache")
            if (not state.cut_first or state.first_pruned or state.first_cut or cache is None
                    or kwargs.get("cross_attention_states") is None):
                return
            cached = cache.layers[index]
            cached.keys = _take_tokens(cached.keys, state.gather)
            cached.values = _take_tokens(cached.values, state.gather)
            state.first_cut = True
            return

        return hook

    def _later_hook(self, state: _TrimState):
        def hook(layer, args, kwargs):
            states = kwargs.get("cross_attention_states")
            if states is not None:  # prefill: this layer projects and caches only the kept features
                states = _per_sample(states, len(state.gather))
                kwargs["cross_attention_states"] = torch.stack([states[b, idx] for b, idx in enumerate(state.gather)])
            kwargs["cross_attention_mask"] = _take_columns(kwargs["cross_attention_mask"], state)
            return args, kwargs

        return hook

    # -- calls ---------------------------------------------------------------------------------------------

    def forward(self, inputs, plan: PrunePlan, **kwargs):
        """One prefill forward (position ids from the padding mask); returns the model output and the records."""
        positions = left_pad_positions(inputs["attention_mask"])
        with self.exclusive():
            if plan.is_noop:
                return self.model(**inputs, position_ids=positions, **kwargs), self.unpruned_records(inputs)
            with self.applied(inputs, plan) as state:
                out = self.model(**inputs, position_ids=positions, **kwargs)
        return out, state.records

    def _prefill_logits(self, inputs, plan: PrunePlan):
        out, records = self.forward(inputs, plan, logits_to_keep=1)
        return out.logits[:, -1], records

    def _generate(self, inputs, plan: PrunePlan, **gen):
        prompt_len = inputs["input_ids"].shape[1]
        if plan.is_noop:
            return self.model.generate(**inputs, **gen)[:, prompt_len:], self.unpruned_records(inputs)
        with self.applied(inputs, plan) as state:
            out = self.model.generate(**inputs, **gen)
        return out[:, prompt_len:], state.records

    def unpruned_records(self, inputs) -> list[SampleRecord]:
        counts = self.visual_valid(inputs).sum(dim=1).tolist()
        return [SampleRecord(kept=list(range(n)), num_visual=n) for n in counts]

    # -- where the tokens sit (vtprune show) ------------------------------------------------------------

    def token_layout(self, inputs, b: int) -> TokenLayout:
        """Mllama: the padded canvas split into tiles row-major; per tile a CLS token, then its patches row-major.

        Empty (padding) tiles come last and are no candidates, so they have no entries here.
        """
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        cfg = self.model.config.vision_config
        size, patch = cfg.image_size, cfg.patch_size
        processor = self.processor.image_processor
        ratio_id = int(inputs["aspect_ratio_ids"][b][0])
        rows, cols = get_all_supported_aspect_ratios(processor.max_image_tiles)[ratio_id - 1]
        tiles = inputs["pixel_values"][b][0][: rows * cols]
        view = Image.new("RGB", (cols * size, rows * size))
        boxes: list[Box | None] = []
        for t, tile in enumerate(tiles):
            x0, y0 = t % cols * size, t // cols * size
            view.paste(to_image(tile, processor), (x0, y0))
            boxes += [None, *grid_boxes(x0, y0, size // patch, size // patch, patch)]
        return TokenLayout(view, boxes)

    # -- benchmarks ----------------------------------------------------------------------------------------

    @classmethod
    def max_visual_tokens(cls, hf_config) -> int:
        """Every tile of the largest canvas, each its patches and a CLS token."""
        return hf_config.vision_config.max_num_tiles * tile_tokens(hf_config)

    def num_synthetic_visual(self) -> int:
        """Visual tokens of one synthetic image: every tile is real."""
        return self.model.config.vision_config.max_num_tiles * self.tokens_per_tile

    def synthetic_inputs(self, batch_size: int, prompt_tokens: int, generator: torch.Generator | None = None):
        """Random pixels on every tile, then the image token followed by ``prompt_tokens`` random text tokens."""
        cfg, vision = self.model.config, self.model.config.vision_config
        words = self.synthetic_words(batch_size, prompt_tokens, generator, cfg.image_token_id)
        input_ids = torch.cat([torch.full((batch_size, 1), cfg.image_token_id), words], dim=1)
        tiles, size = vision.max_num_tiles, vision.image_size
        ratios = [list(r) for r in vision.supported_aspect_ratios]
        ratio_id = next((i + 1 for i, (h, w) in enumerate(ratios) if h * w == tiles), 1)  # ids are 1-based
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.rand(batch_size, 1, tiles, 3, size, size, generator=generator) * 2 - 1,
            "aspect_ratio_ids": torch.full((batch_size, 1), ratio_id),
            "aspect_ratio_mask": torch.ones(batch_size, 1, tiles, dtype=torch.long),
            "cross_attention_mask": torch.ones(batch_size, input_ids.shape[1], 1, tiles, dtype=torch.long),
        }
        return self.on_model(inputs)

    @classmethod
    def vision_flops(cls, hf_config) -> int:
        """Every tile (``max_num_tiles``, as the synthetic input): patch embedding, then the local and the global
        transformer layers over the tiles' tokens together, each tile's patches + CLS padded to a multiple of 8 as
        transformers pads them (masked, but computed: every query-key pair counts), then the projector
        (``vision_output_dim`` → text hidden) over the unpadded tokens. Tile embeddings and gates are left out."""
        vision, tiles = hf_config.vision_config, hf_config.vision_config.max_num_tiles
        patches = (vision.image_size // vision.patch_size) ** 2
        padded = patches + 1 + (-(patches + 1)) % 8
        embed = 2 * tiles * patches * vision.num_channels * vision.patch_size**2 * vision.hidden_size
        layer = encoder_layer_flops(tiles * padded, vision.hidden_size, vision.intermediate_size)
        projector = 2 * tiles * (patches + 1) * vision.vision_output_dim * hf_config.text_config.hidden_size
        return embed + (vision.num_hidden_layers + vision.num_global_layers) * layer + projector

    # -- the tiny model (vtprune.models.tiny) ----------------------------------------------------------------

    @classmethod
    def build_tiny(cls, tokenizer, vocab, text=None, vision=None):
        from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
            image_size=32, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0], vision_output_dim=64,
            supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
            initializer_range=0.2,
        ) | (vision or {})
        config = MllamaConfig(
            vision_config=vision,
            text_config=dict(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=cls.tiny_text_layers,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=2048,
                initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ) | (text or {}),
            image_token_index=image_token_id,
        )
        model = MllamaForConditionalGeneration(config).eval()
        with torch.no_grad():
            # Real checkpoints have trained, non-zero tanh gates; a fresh init has zero gates, which would make
            # the image (and hence any visual-token pruning) invisible in the output.
            for layer in model.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn_attn_gate.fill_(1.0)
                    layer.cross_attn_mlp_gate.fill_(1.0)
        size = vision["image_size"]
        image_processor = MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=vision["max_num_tiles"])
        processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_MLLAMA_TEMPLATE)
        return model, processor


def tile_tokens(config) -> int:
    """Mllama: visual tokens of one tile, its patches and a CLS token."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side + 1


def cross_attention_scores(layer, hidden, states, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]`` per query head attention of the valid text rows to the valid visual tokens, row mean.

    Recomputed from one Mllama cross-attention decoder layer's ``input_layernorm``/``q_proj``/``q_norm`` and
    ``k_proj``/``k_norm`` (the eager formula, before the tanh gate); ``rows`` [B, S] and ``columns`` [B, N] mark
    what is valid, so padding tiles get no probability and masked-out text rows do not count.
    """
    attn = layer.cross_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2))
    k = attn.k_proj(states).view(batch, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_norm(k).repeat_interleave(attn.num_key_value_groups, dim=1)  # key heads shared by query groups
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [B, H, S, N]
    probs = torch.softmax(logits.masked_fill(~columns[:, None, None, :], float("-inf")), dim=-1)
    weights = rows.float()[:, None, :, None]
    return (probs * weights).sum(dim=2) / weights.sum(dim=2).clamp(min=1)


def tile_cls_attention(layer, hidden: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """``[B, tiles, tokens_per_tile]`` attention of each tile's CLS to that tile's tokens in one vision layer, head mean.

    ``hidden`` is the layer's input ``[B, tiles · padded_len, D]`` (each tile padded to a multiple of 8). The
    softmax runs over the tile's own tokens, the CLS itself included (it is a visual token the LLM sees, so it
    competes like any other); per-tile normalisation keeps a tile's ranking identical to the model's.
    """
    attn = layer.self_attn
    batch, _, dim = hidden.shape
    tiles = hidden.shape[1] // (tokens_per_tile + (8 - tokens_per_tile % 8) % 8)
    x = layer.input_layernorm(hidden).view(batch, tiles, -1, dim)[:, :, :tokens_per_tile]
    q = attn.q_proj(x[:, :, :1]).view(batch, tiles, 1, attn.num_heads, attn.head_dim).transpose(2, 3)
    k = attn.k_proj(x).view(batch, tiles, tokens_per_tile, attn.num_heads, attn.head_dim).transpose(2, 3)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scaling, dim=-1)  # [B, tiles, H, 1, P]
    return probs.mean(dim=2)[:, :, 0]


def _per_sample(states: torch.Tensor, batch: int) -> torch.Tensor:
    """The projected vision states come as ``[B · tiles, tokens_per_tile, D]``; the layer reads them as ``[B, N, D]``."""
    return states.reshape(batch, -1, states.shape[-1])


def _take_tokens(t: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Cached ``[B, heads, N, d]`` keys or values at the kept token indices ``[B, K]``."""
    index = gather[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]).to(t.device)
    return torch.gather(t, 2, index)


def _take_columns(mask: torch.Tensor, state: _TrimState) -> torch.Tensor:
    """A prepared ``[B, 1, S, N]`` cross-attention mask at the kept columns, the pad columns masked."""
    index = state.gather[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1).to(mask.device)
    taken = torch.gather(mask, 3, index)
    return taken.masked_fill(~state.gather_valid[:, None, None, :].to(mask.device), torch.finfo(mask.dtype).min)


_MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
