"""The expected KV-cache bytes of an adapter run, from vtprune.bench.kv (the one place that accounts for them)."""

from vtprune.bench.kv import analytic_kv_bytes, measured_kv_bytes


def expected_kv(adapter, plan, *, batch_size, text_tokens, num_visual, num_kept):  # num_kept: int, or per stage
    config = adapter.model.config
    return analytic_kv_bytes(
        config, batch_size=batch_size, text_tokens=text_tokens, num_visual=num_visual,
        num_kept=num_visual if plan.is_noop else num_kept, placement=adapter.placement(plan),
        element_size=adapter.model.dtype.itemsize,
    )


def measured_kv(adapter, cache):
    return measured_kv_bytes(cache, adapter.model.config)
