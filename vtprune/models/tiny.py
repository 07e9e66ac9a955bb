"""Tiny random models of every family, built offline and cached, so every command runs on a laptop CPU.

`tiny:<family>` resolves to a directory under the cache (``$VTPRUNE_CACHE`` or ``~/.cache/vtprune``)
holding a normal transformers checkpoint + processor; it is built once, deterministically from a seed,
and then loaded with ``from_pretrained`` exactly like a real checkpoint.

This file holds what the recipes share (the tokenizer, the cache, the LLaMA text and CLIP vision configs, LLaVA's
chat template); each family's own recipe is its adapter's ``build_tiny``, beside its spec, so a new family is one
spec file. The families with a recipe are read from the family registry, which ``vtprune.models`` fills before
this module runs.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

from vtprune.models.base import FAMILIES

TINY_VERSION = "v1"  # bump when a recipe changes so stale caches are not reused
TINY_SEED = 1234
TINY_FAMILIES = tuple(name for name in FAMILIES.in_order() if "build_tiny" in vars(FAMILIES.get(name)))
# Decoder layers of each tiny language model: config validation bounds layer options (fastv's K) by them without
# building the checkpoint.
TINY_TEXT_LAYERS = {name: FAMILIES.get(name).tiny_text_layers for name in TINY_FAMILIES}

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

LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
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

    adapter = FAMILIES.get(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIALS + list(adapter.tiny_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **adapter.tiny_token_names)
    return fast


def _build(family: str, out: Path) -> None:
    model, processor = build_model(family)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_model(family: str, *, corpus=_CORPUS, vocab_size: int = 384, seed: int = TINY_SEED, text=None, vision=None):
    """(model, processor) of ``family`` by its tiny recipe. ``text`` / ``vision`` override entries of the language
    and vision configs (the micro models are the same architectures, larger; the image size follows
    ``vision['image_size']``); without them this is the tiny model exactly."""
    import torch

    tokenizer = _tokenizer(family, corpus, vocab_size)
    vocab = len(tokenizer)
    build = FAMILIES.get(family).build_tiny
    overrides = {k: v for k, v in (("text", text), ("vision", vision)) if v}
    if overrides and not set(overrides) <= set(inspect.signature(build).parameters):
        sized = [f for f in TINY_FAMILIES if "vision" in inspect.signature(FAMILIES.get(f).build_tiny).parameters]
        raise ValueError(f"{family}: the tiny recipe takes no size overrides (sized: {', '.join(sized)})")
    # Seeded weights without touching the caller's RNG (models are built on the CPU).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build(tokenizer, vocab, **overrides)


def llama_text(vocab: int, tokenizer, layers: int, **over) -> dict:
    """The tiny LLaMA language model's config (LLaVA-1.5 and LLaVA-NeXT)."""
    return dict(
        model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ) | over


def clip_vision(**over) -> dict:
    """The tiny CLIP vision tower's config (LLaVA-1.5 and LLaVA-NeXT)."""
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32, initializer_range=0.2,
    ) | over
