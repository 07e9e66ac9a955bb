"""vtprune: how much accuracy visual-token pruning costs a VLM, and how much speed, memory and KV cache it wins."""

__version__ = "0.1.0"


def load(config=None, **keys):
    """Load a pipeline from a YAML config or keywords; see ``vtprune.api.load``. Imports torch lazily."""
    from vtprune.api import load as _load

    return _load(config, **keys)


__all__ = ["__version__", "load"]
