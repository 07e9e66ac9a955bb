"""FLOP counting of one transformer layer: a primitive that the model families (each counts its own vision tower)
and the benchmarks' analytic cost (``vtprune.bench.cost``) both use, so it sits below both."""

from __future__ import annotations


def encoder_layer_flops(tokens: int, hidden: int, intermediate: int, *, mlp_matrices: int = 2,
                        pairs: int | None = None) -> int:
    """Multiply-adds × 2 of one vision-encoder layer over ``tokens`` tokens: q/k/v/o projections (hidden → hidden),
    QKᵀ and AV over ``pairs`` query-key pairs (default every pair, ``tokens²``) and an MLP of ``mlp_matrices``
    hidden × intermediate matrices (2: fc1, fc2; 3: gated). Norms, biases and activations are left out (< 0.1 %)."""
    pairs = tokens * tokens if pairs is None else pairs
    return 2 * (4 * tokens * hidden * hidden + 2 * pairs * hidden + mlp_matrices * tokens * hidden * intermediate)
