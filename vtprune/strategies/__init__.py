"""Pruning strategies, one file each, registered by name in ``STRATEGIES``."""

import importlib

from vtprune.strategies.base import STRATEGIES, Option, Selection, Signals, Strategy, budget, register_strategy

# Every strategy module registers itself on import.
_MODULES = ["none", "random", "uniform", "trimmed_llama", "cls_saliency", "adav", "fastv", "fastervlm", "text_sim", "divprune", "pool", "pdrop", "visionzip", "vispruner", "downsample", "dart", "cdpruner", "hired", "hiprune", "gprune", "prumerge", "prumerge_plus", "sparsevlm", "tome", "mustdrop", "flowcut", "vscan", "fitprune"]
for _name in _MODULES:
    importlib.import_module(f"vtprune.strategies.{_name}")

__all__ = ["STRATEGIES", "Option", "Selection", "Signals", "Strategy", "budget", "register_strategy"]
