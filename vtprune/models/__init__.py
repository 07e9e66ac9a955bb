"""Model-family adapters, one file each, registered by name in ``FAMILIES``; ``load_model`` builds one."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from vtprune.errors import ConfigError
from vtprune.models.base import FAMILIES, Adapter, PrunePlan, SampleRecord

# Registration order is the order families are listed in (the tiny models' included).
for _name in ("mllama", "llava", "llava_next", "qwen2_5_vl", "llava_onevision", "internvl"):
    importlib.import_module(f"vtprune.models.{_name}")


def resolve_path(path: str) -> str:
    """A local directory for ``tiny:<family>`` (built on first use) and ``micro:<family>`` (trained checkpoints
    shipped in the package, ``vtprune/models/micro/<family>``); other paths are passed on unchanged."""
    if path.startswith("tiny:"):
        from vtprune.models.tiny import tiny_path

        return str(tiny_path(path[5:]))
    if path.startswith("micro:"):
        shipped = micro_families()
        if path[6:] not in shipped:
            raise ConfigError(f"model.path: unknown micro model '{path}' (allowed: {', '.join('micro:' + f for f in shipped)})")
        return str(MICRO_ROOT / path[6:])
    return path


MICRO_ROOT = Path(__file__).parent / "micro"  # trained by scripts/train_micro.py


def micro_families() -> list[str]:
    """The families with a trained micro checkpoint shipped in the package."""
    if not MICRO_ROOT.is_dir():
        return []
    return sorted(d.name for d in MICRO_ROOT.iterdir() if (d / "config.json").exists())


def resolve_family(model_type: str, declared: str) -> type[Adapter]:
    """The adapter class for a transformers ``model_type``; ``declared`` (not 'auto') must agree with it."""
    if declared != "auto":
        adapter = FAMILIES.get(declared)
        if model_type not in adapter.model_types:
            raise ConfigError(f"model.family: '{declared}' does not match the model's type '{model_type}' (use auto)")
        return adapter
    for _, adapter in FAMILIES.items():
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for _, a in FAMILIES.items() for t in a.model_types)
    raise ConfigError(f"model.path: model type '{model_type}' is not supported (allowed: {', '.join(known)})")


def load_model(model_cfg) -> Adapter:
    """Load the model and processor named by a ``ModelConfig`` and wrap them in their family's adapter."""
    import torch
    import transformers
    from transformers import AutoConfig

    with _no_progress_bar():  # building a tiny model writes shards
        path = resolve_path(model_cfg.path)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot load a model config from '{model_cfg.path}': {str(exc).splitlines()[0]}") from None
    adapter_cls = resolve_family(hf_config.model_type, model_cfg.family)
    device = model_cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model_cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model_cls = getattr(transformers, adapter_cls.model_class)
    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation=model_cfg.attn_implementation)
    if model_cfg.weights == "random":
        # Architecture only: for speed and memory benchmarks of full-size models without a download.
        with torch.device(device):
            model = model_cls._from_config(hf_config, **kwargs)
    else:
        with _no_progress_bar():
            model = model_cls.from_pretrained(path, **kwargs).to(device)
    model.eval()
    processor = None
    if model_cfg.weights == "pretrained" or Path(path, "preprocessor_config.json").exists():
        processor = adapter_cls.load_processor(path)
    return adapter_cls(model, processor)


@contextlib.contextmanager
def _no_progress_bar():
    """transformers' progress bars off for one step of our load: the user's process keeps its own setting."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


__all__ = ["FAMILIES", "Adapter", "PrunePlan", "SampleRecord", "load_model", "resolve_family", "resolve_path"]
