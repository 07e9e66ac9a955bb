"""The vectors a selection leaves in the sequence: kept tokens as they are, merged tokens built from their weights.

Both engines build them the same way (the HF adapters' pre-LLM splice and the vLLM plugin), so that one strategy
gives the same tokens wherever it runs.
"""

from __future__ import annotations

import torch


def slot_features(selection, features: torch.Tensor, before_projector=None) -> torch.Tensor:
    """``[N, D]`` features of one sample with each merged token in its anchor's slot (the caller keeps
    ``selection.slots`` of them). ``before_projector``: ``(vectors [N, D_v], project)`` for a strategy that merges
    before the projector (``merge_space`` "vision" or "input"), else the merge averages the features themselves."""
    if not selection.num_merged:
        return features
    features = features.clone()
    weights = selection.weights[:, : len(features)]
    if before_projector is None:
        features[selection.anchors] = weights.to(features) @ features
    else:
        vectors, project = before_projector
        features[selection.anchors] = project(weights.to(vectors) @ vectors).to(features)
    return features
