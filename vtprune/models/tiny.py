"""Tiny random models of every family, built offline and cached, so every command runs on a laptop CPU.

`tiny:<family>` resolves to a directory under the cache (``$VTPRUNE_CACHE`` or ``~/.cache/vtprune``)
holding a normal transformers checkpoint + processor; it is built once, deterministically from a seed,
and then loaded with ``from_pretrained`` exactly like a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "v1"  # bump when the recipe changes so stale caches are not reused
TINY_FAMILIES = ("mllama", "llava", "llava_next", "qwen2_5_vl", "llava_onevision", "internvl")
TINY_SEED = 1234
# Decoder layers of each tiny language model: the recipe reads them here, and config validation bounds layer
# options (fastv's K) by them without building the checkpoint.
TINY_TEXT_LAYERS = {"mllama": 5, "llava": 4, "llava_next": 4, "qwen2_5_vl": 4, "llava_onevision": 4, "internvl": 4}

# Families whose builder takes size overrides (``build_model``): those with a micro model.
_SIZED = ("llava", "mllama", "llava_next", "qwen2_5_vl")

# Byte-level BPE is trained on this little corpus: enough merges that prompts tokenize to sensible lengths.
_CORPUS = """
What is shown in the image? What color is the object? How many objects are there? What does the sign say?
Is there a red square? The image shows a blue circle on a white background. Describe the picture in detail.
yes no one two three four five red green blue yellow black white square circle triangle text word sign
A photo of a cat sitting on a mat. A dog runs in the park. The number written on the board is 42.
question answer short reply with a single word or phrase please describe what you see here in the scene
""".strip().split("\n")

_SPECIALS = [
    "<pad>", "<s>", "</s>", "<unk>", "<image>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|image|>", "<|python_tag|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>",
]
# Added after _SPECIALS for qwen2_5_vl only, so the other families' tokenizers (and weights) stay unchanged.
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

_MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    env = os.environ.get("VTPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vtprune"


def tiny_path(family: str) -> Path:
    """Directory of the tiny checkpoint of ``family``, built on first use."""
    if family not in TINY_FAMILIES:
        from vtprune.errors import ConfigError

        raise ConfigError(f"model.path: unknown tiny model 'tiny:{family}' (allowed: {', '.join('tiny:' + f for f in TINY_FAMILIES)})")
    target = cache_root() / "tiny" / f"{family}-{TINY_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
        try:
            _build(family, tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _tokenizer(family: str, corpus=_CORPUS, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = _SPECIALS + _QWEN_SPECIALS if family == "qwen2_5_vl" else _SPECIALS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if family == "mllama":
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    elif family == "qwen2_5_vl":  # like Qwen: no BOS, the turn ends with <|im_end|>
        names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    else:
        names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **names)
    return fast


def _build(family: str, out: Path) -> None:
    model, processor = build_model(family)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_model(family: str, *, corpus=_CORPUS, vocab_size: int = 384, seed: int = TINY_SEED, text=None, vision=None):
    """(model, processor) of ``family`` by the tiny recipe. ``text`` / ``vision`` override entries of the language
    and vision configs (the micro models are the same architectures, larger; the image size follows
    ``vision['image_size']``); without them this is the tiny model exactly."""
    import torch

    tokenizer = _tokenizer(family, corpus, vocab_size)
    vocab = len(tokenizer)
    builders = {
        "mllama": _build_mllama, "llava": _build_llava, "llava_next": _build_llava_next, "qwen2_5_vl": _build_qwen2_5_vl,
        "llava_onevision": _build_llava_onevision, "internvl": _build_internvl,
    }
    overrides = {k: v for k, v in (("text", text), ("vision", vision)) if v}
    if overrides and family not in _SIZED:
        raise ValueError(f"{family}: the tiny recipe takes no size overrides (sized: {', '.join(_SIZED)})")
    # Seeded weights without touching the caller's RNG (models are built on the CPU).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return builders[family](tokenizer, vocab, **overrides)


def _llama_text(vocab: int, tokenizer, **over) -> dict:
    return dict(
        model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
        num_hidden_layers=TINY_TEXT_LAYERS["llava"],  # llava and llava_next share this language model
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ) | over


def _clip_vision(**over) -> dict:
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32, initializer_range=0.2,
    ) | over


def _build_mllama(tokenizer, vocab, text=None, vision=None):
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
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_TEXT_LAYERS["mllama"],
            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=2048,
            initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ) | (text or {}),
        image_token_index=image_token_id,
    )
    model = MllamaForConditionalGeneration(config).eval()
    with __import__("torch").no_grad():
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


def _build_llava(tokenizer, vocab, text=None, vision=None):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = _clip_vision(**(vision or {}))
    size, patch = vision["image_size"], vision["patch_size"]
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_text(vocab, tokenizer, **(text or {})), image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def _build_llava_next(tokenizer, vocab, text=None, vision=None):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = _clip_vision(**(vision or {}))
    size, patch = vision["image_size"], vision["patch_size"]
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]  # crops of one base image
    config = LlavaNextConfig(
        vision_config=vision, text_config=_llama_text(vocab, tokenizer, **(text or {})), image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        image_seq_length=(size // patch) ** 2,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def _build_qwen2_5_vl(tokenizer, vocab, text=None, vision=None):
    """Qwen2.5-VL: dynamic resolution (8-px patches, 2x2 merge), window attention with full-attention blocks, M-RoPE.

    Images are resized to multiples of 16 px with an area between 32x32 and 96x96 pixels, so a picture gives 4 to 36
    visual tokens and different sizes give different counts (width x height: 40x30 -> 4, 30x70 -> 8, 56x56 -> 16,
    112x56 -> 28, 112x112 -> 36).
    Windows are 32 px (2x2 merged tokens): images larger than one window really use window attention in
    blocks 0 and 2, while blocks 1 and 3 attend over the whole image.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
    )}
    patch, merge, temporal = 8, 2, 2
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=temporal, window_size=32, out_hidden_size=64,
            fullatt_block_indexes=[1, 3], tokens_per_second=2, initializer_range=0.2,
        ) | (vision or {}),
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_TEXT_LAYERS["qwen2_5_vl"],
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ) | (text or {}),
        **ids,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96}, patch_size=patch, merge_size=merge,
        temporal_patch_size=temporal,
    )
    from vtprune.models.qwen2_5_vl import image_only_processor

    processor = image_only_processor()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE
    )
    return model, processor


def _build_llava_onevision(tokenizer, vocab):
    """LLaVA-OneVision: a SigLIP tower (no CLS token, features of the last layer, strategy ``full``), a Qwen2 language
    model, anyres crops of 32 px with a newline per grid row, and the grid downsampled beyond two crops' worth of
    patches (``anyres_max_2``, the 7B model's ``anyres_max_9`` scaled to 2x2 grids).

    Width x height -> visual tokens: 30x70 -> 56 (2x1 crops, 8x4 patches, not downsampled), 90x40 -> 52 (1x2 crops,
    unpadded), 80x50 -> 44 (2x2 crops unpadded to 6x8 patches, downsampled to 4x6), 40x40 -> 46 (8x8 to 5x5).
    The tokenizer is LLaVA's plus a ``<video>`` token (the model's video token id), added here only.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from vtprune.models.llava_onevision import image_only_processor

    tokenizer.add_tokens(["<video>"], special_tokens=True)
    vocab = len(tokenizer)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
            num_hidden_layers=TINY_TEXT_LAYERS["llava_onevision"], num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_2",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only_processor()(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=_LLAVA_TEMPLATE, vision_aspect_ratio="anyres_max_2",
    )
    return model, processor


def _build_internvl(tokenizer, vocab):
    """InternVL3: an InternViT tower (CLS token, features of the last layer, ``default`` strategy: CLS dropped) on
    64 px tiles of 8 px patches, pixel shuffle 0.5 (8x8 patches -> 4x4 = 16 tokens per tile), a Qwen2 language model,
    and the processor's dynamic tiling with at most 4 tiles plus a thumbnail tile after them (none for one tile).

    Width x height -> tiles -> visual tokens: 40x40 -> 1x1 (no thumbnail) -> 16, 30x70 -> 1 column x 2 rows + thumbnail
    -> 48, 90x40 -> 2 columns x 1 row + thumbnail -> 48, 100x100 -> 2x2 + thumbnail -> 80.
    The tokenizer is LLaVA's BPE plus InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` (the image token), ``<video>``
    and Qwen's ``<|im_start|>`` / ``<|im_end|>`` turn markers, added here only (so the other families' tokenizers stay
    as they are), named like InternVL3's: no BOS, the turn ends with ``<|im_end|>``, the image tokens' names for the
    processor. The CLS token and the position embeddings, zeros in a fresh init, are drawn at random so that the CLS
    attention is not uniform (trained checkpoints have both).
    """
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vtprune.models.internvl import INTERNVL_TOKENS, image_only_processor

    tokenizer.add_tokens([*INTERNVL_TOKENS.values(), "<|im_start|>", "<|im_end|>"], special_tokens=True)
    # The named tokens the InternVL processor reads (tokenizer.start_image_token, .context_image_token_id, ...).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, padding_side="left", eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=dict(INTERNVL_TOKENS),
    )
    vocab = len(tokenizer)
    max_tiles = 4
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=64,
            patch_size=8, attention_bias=True, use_mean_pooling=True, initializer_range=0.2,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
            num_hidden_layers=TINY_TEXT_LAYERS["internvl"], num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.max_dynamic_patch = max_tiles  # the processor's max_patches, for config-only counts (vtprune.models.internvl)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(std=0.5)
        embeddings.position_embeddings.normal_(std=0.5)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    processor = image_only_processor()(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16, chat_template=_INTERNVL_TEMPLATE,
    )
    return model, processor


# InternVL3's chat format (Qwen2.5's turns, the image as <IMG_CONTEXT> on its own line), no system prompt.
_INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
