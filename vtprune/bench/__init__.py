"""Speed, memory and KV-cache benchmarks (``run_bench``) and the analytic cost of a full-size model (``cost_for_config``)."""

from vtprune.bench.cost import cost_for_config, cost_rows
from vtprune.bench.runner import run_bench

__all__ = ["cost_for_config", "cost_rows", "run_bench"]
