"""Tiny random models of every family, built offline and cached, so every command runs on a laptop CPU.

`tiny:<family>` resolves to a directory under the cache (``$VTPRUNE_CACHE`` or ``~/.cache/vtprune``)
holding a normal transformers checkpoint + processor; it is built once, deterministically from a seed,
and then loaded with ``from_pretrained`` exactly like a real checkpoint. Every cache entry (these and the mini task
data, ``vtprune.eval.mini``) is made by ``cached``: built aside, a manifest of sizes and sha256 written last, renamed
into place; checked on use and rebuilt when damaged.

This file holds what the recipes share (the tokenizer, the cache, the LLaMA text and CLIP vision configs, LLaVA's
chat template); each family's own recipe is its adapter's ``build_tiny``, beside its spec, so a new family is one
spec file. The families with a recipe are read from the family registry, which ``vtprune.models`` fills before
this module runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from vtprune.models.base import FAMILIES

TINY_VERSION = "v2"  # bump when a recipe or the saved files change so stale caches are not reused
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
    return cached(cache_root() / "tiny" / f"{family}-{TINY_VERSION}", lambda out: _build(family, out), f"tiny:{family}")


MANIFEST = "manifest.json"
STALE_SECONDS = 3600  # a build folder this old is a killed build's: a real one takes seconds
_hashed: set[Path] = set()  # entries whose files were hashed in this process: later uses check sizes only


def cached(target: Path, build, what: str) -> Path:
    """``target``, a cache entry that ``build(folder)`` fills, built when missing and rebuilt (with one note on stderr)
    when a file differs from the size and sha256 its manifest recorded at build time. The entry is built in a hidden
    folder beside it, its manifest written last, and renamed into place: a killed build never leaves an entry that
    looks finished, and its hidden folder is removed by a later build."""
    if (target / MANIFEST).exists():  # without one, an older vtprune's entry: rebuilt without a note
        problem = entry_problem(target)
        if problem is None:
            return target
        print(f"note: {what}: the cached copy in {target} is damaged ({problem}); rebuilding it", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}@{socket.gethostname()}-", dir=target.parent))
    try:
        build(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1) + "\n")
        _honour_umask(tmp)
        if target.exists() or target.is_symlink():  # the damaged entry: moved aside first, as rename cannot replace it
            trash = tmp.with_name(tmp.name + "-old")
            target.rename(trash)
            _remove(trash)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            _remove(tmp)
    except BaseException:
        _remove(tmp)
        raise
    _hashed.add(target)
    return target


def entry_problem(target: Path) -> str | None:
    """What is wrong with a cache entry, None when nothing is: every file of its manifest present at its size, and
    (once per process: hashing is cheap but not free) of its sha256."""
    try:
        files = json.loads((target / MANIFEST).read_text())["files"]
        for name, entry in files.items():
            path = target / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
        if target not in _hashed:
            for name, entry in files.items():
                if _sha256(target / name) != entry["sha256"]:
                    return f"{name} does not match the sha256 recorded when it was written"
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not readable"
    _hashed.add(target)
    return None


def remove_stale(folder: Path) -> None:
    """Remove the hidden build folders of killed builds in ``folder``: older than STALE_SECONDS, or made on this
    machine by a process that is gone."""
    host = socket.gethostname()
    for path in folder.glob(".*"):
        owner = re.search(r"\.(\d+)@(.+)-[a-z0-9_]{8}(-old)?$", path.name)  # the names cached() gives
        try:
            old = time.time() - path.lstat().st_mtime > STALE_SECONDS
        except OSError:  # removed meanwhile
            continue
        if old or owner and owner[2] == host and not _alive(int(owner[1])):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and some writers (safetensors) make files 0600: give the entry the modes the
    umask would, so that a cache shared by a group is readable by it."""
    from vtprune.results import umask

    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
    FAMILIES.get(family).write_serving_files(out)


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
