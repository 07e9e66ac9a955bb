"""Join every row with the unpruned (``none``, keep 1.0) row of the same model and task / batch size, and
format the result as markdown, CSV or JSON."""

from __future__ import annotations

import math

import pandas as pd

from vtprune.bench.timing import too_wide
from vtprune.report.load import Results

SMOKE_MARK = "smoke figures: tiny random model, not accuracy claims"
MICRO_MARK = ("micro-model figures: small models trained on vtprune's synthetic shapes-and-words tasks, not claims "
              "about any released model")
UNSCORED = "unscored"
SPEED_COLUMNS = {  # bench column → (table header, unit)
    "ttft_ms": ("TTFT", "ms"),
    "decode_ms_per_token": ("decode / token", "ms"),
    "e2e_ms": ("end-to-end", "ms"),
    "peak_memory_bytes": ("peak memory", "bytes"),
    "kv_bytes": ("KV cache (self+cross)", "bytes"),
}
TIMED = ("ttft_ms", "decode_ms_per_token", "e2e_ms")  # an interleaved bench measures their ratio to none itself
IDEAL_COLUMNS = {  # timing → (table header, bench column of its ideal speed-up)
    "ttft_ms": ("TTFT ×ideal", "ideal_ttft_speedup"),
    "decode_ms_per_token": ("decode ×ideal", "ideal_decode_speedup"),
}
_ACC_KEY = ["model", "task", "metric"]
_SPEED_KEY = ["model", "device", "dtype", "batch_size"]


def is_reference(frame: pd.DataFrame) -> pd.Series:
    return (frame["strategy"] == "none") & ((pd.to_numeric(frame["keep_ratio"]) - 1.0).abs() < 1e-9)


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series(float("nan"), index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def accuracy_frame(metrics: pd.DataFrame, samples: dict[str, list[dict]] | None = None) -> pd.DataFrame:
    """metrics rows + ``ref_value`` (the unpruned score of the same model/task/metric) and ``pct_of_unpruned``, and
    the fidelity to that unpruned run (``loyalty``, ``top1_agreement``, ``kl_mean``, ``fidelity_n``) computed from
    both runs' ``samples`` (run_dir -> samples.jsonl rows; ``vtprune.fidelity``)."""
    if metrics.empty:
        return metrics
    m = metrics.copy()
    m["value"] = _numeric(m, "value")
    scored = m["scored"].fillna(True).astype(bool) if "scored" in m.columns else True
    # A value without a score (e.g. no judge API key) must never be shown as a number.
    m["scored"] = scored & m["value"].notna()
    ref = m[is_reference(m) & m["scored"]][[*_ACC_KEY, "value"]].rename(columns={"value": "ref_value"})
    m = m.merge(ref.drop_duplicates(_ACC_KEY), on=_ACC_KEY, how="left")
    usable = m["scored"] & m["ref_value"].notna() & (m["ref_value"] != 0)
    m["pct_of_unpruned"] = (100 * m["value"] / m["ref_value"]).where(usable)
    for column in ("kept_fraction_mean", "num_visual_mean", "num_kept_mean", "equivalent_tokens_mean"):
        m[column] = _numeric(m, column)
    return _with_fidelity(m, samples or {})


FIDELITY_COLUMNS = ("loyalty", "top1_agreement", "kl_mean")


def _with_fidelity(m: pd.DataFrame, samples: dict[str, list[dict]]) -> pd.DataFrame:
    """Each row's fidelity to the unpruned run of its model and task, recomputed from the two runs' samples (so a
    point evaluated before its reference has it too); NaN where either run's samples are missing."""
    from vtprune.fidelity import compare

    if "run_dir" not in m.columns:
        for column in (*FIDELITY_COLUMNS, "fidelity_n"):
            m[column] = float("nan")
        return m
    # Fidelity is per task: the unpruned run of the task, whether or not each of its metrics is scored.
    refs = m[is_reference(m)].drop_duplicates(["model", "task"]).set_index(["model", "task"])["run_dir"]
    by_pair: dict[tuple, dict] = {}  # (reference run, run) -> compare()'s summary per task

    def summary(row) -> dict:
        pair = (refs.get((row.model, row.task)), row.run_dir)
        if pair not in by_pair:
            ref, own = (samples.get(d) for d in pair)
            by_pair[pair] = compare(ref, own)[1] if ref and own else {}
        return by_pair[pair].get(row.task, {})

    found = pd.DataFrame([summary(row) for row in m.itertuples()], index=m.index)
    for column in (*FIDELITY_COLUMNS, "n"):
        values = found[column] if column in found.columns else pd.Series(float("nan"), index=m.index)
        m["fidelity_n" if column == "n" else column] = pd.to_numeric(values, errors="coerce").astype(float)
    return m


def speed_frame(bench: pd.DataFrame, every_row: pd.DataFrame | None = None) -> pd.DataFrame:
    """bench rows + ``kv_bytes`` and, per figure, ``<figure>_ref`` and ``<figure>_ratio`` to unpruned.

    The unpruned reference of a row is the one its own run measured, looked up in ``every_row`` (the bench rows
    before a rerun's rows replaced older ones), so that a later bench of other strategies does not re-base an
    earlier run's memory and KV ratios; else the newest unpruned row of the same model, device, dtype and batch
    size. A timing's ratio is the row's own paired ratio (with ``_lo`` / ``_hi``) where the bench measured one,
    else the ratio of the medians; ``noisy`` is False for rows that do not say."""
    if bench.empty:
        return bench
    b = _with_figures(bench)
    ref = b[is_reference(b)][[*_SPEED_KEY, *SPEED_COLUMNS]].drop_duplicates(_SPEED_KEY)
    b = b.merge(ref.rename(columns={c: f"{c}_ref" for c in SPEED_COLUMNS}), on=_SPEED_KEY, how="left")
    rows = b if every_row is None or every_row.empty else every_row
    if "run_dir" in b.columns and "run_dir" in rows.columns:
        key = [*_SPEED_KEY, "run_dir"]
        own = _with_figures(rows[is_reference(rows)])[[*key, *SPEED_COLUMNS]].drop_duplicates(key, keep="last")
        b = b.merge(own.rename(columns={c: f"{c}_own" for c in SPEED_COLUMNS}).assign(_own=True), on=key, how="left")
        has_own = b.pop("_own").eq(True)
        for column in SPEED_COLUMNS:
            b[f"{column}_ref"] = b.pop(f"{column}_own").where(has_own, b[f"{column}_ref"])
    for column in SPEED_COLUMNS:
        ref_value = b[f"{column}_ref"]
        paired = _numeric(b, f"{column}_ratio")
        b[f"{column}_ratio"] = paired.fillna((b[column] / ref_value).where(ref_value > 0))
    for column in TIMED:
        for end in ("_lo", "_hi"):
            b[f"{column}_ratio{end}"] = _numeric(b, f"{column}_ratio{end}")
    for _, ideal in IDEAL_COLUMNS.values():
        b[ideal] = _numeric(b, ideal)  # NaN in benches from before the ideal was recorded
    b["noisy"] = b["noisy"].eq(True) if "noisy" in b.columns else False
    return b


def _with_figures(bench: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``bench`` with ``kv_bytes`` and every speed figure numeric."""
    b = bench.copy()
    kv_self, kv_cross = _numeric(b, "kv_self_bytes"), _numeric(b, "kv_cross_bytes")
    b["kv_bytes"] = kv_self.fillna(0) + kv_cross.fillna(0)
    b.loc[kv_self.isna() & kv_cross.isna(), "kv_bytes"] = float("nan")
    for column in SPEED_COLUMNS:
        b[column] = _numeric(b, column)
    b["kept_fraction_mean"] = _numeric(b, "kept_fraction_mean")
    return b


def merged_frame(results: Results) -> pd.DataFrame:
    """The accuracy and speed rows in one long table (``kind`` says which), for ``--format csv|json``."""
    parts = [frame.assign(kind=kind) for kind, frame in
             (("accuracy", accuracy_frame(results.metrics, results.samples)), ("speed", speed_frame(results.bench, results.bench_rows))) if not frame.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["kind"])


# -- formatting ------------------------------------------------------------------------------------------------


def human_bytes(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return ""


def _number(value: float, digits: int = 4) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def _fraction_range(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    low, high = values.min(), values.max()
    return f"{low:.3f}" if high - low < 5e-4 else f"{low:.3f}–{high:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    """The reference row first, then strategies by name, keep ratios from high to low."""
    return frame.assign(_ref=~is_reference(frame)).sort_values(
        ["_ref", "strategy", "keep_ratio"], ascending=[True, True, False], kind="stable").drop(columns="_ref")


def task_columns(acc: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(task, metric, header) per column; the metric is named only where a task has several."""
    pairs = acc[["task", "metric"]].drop_duplicates().sort_values(["task", "metric"]).itertuples(index=False)
    pairs = list(pairs)
    counts = pd.Series([t for t, _ in pairs]).value_counts()
    return [(t, m, f"{t} ({m})" if counts[t] > 1 else t) for t, m in pairs]


def _accuracy_cell(row) -> str:
    if not row.scored:
        return UNSCORED
    if math.isnan(row.pct_of_unpruned):
        return _number(row.value)
    return f"{_number(row.value)} ({row.pct_of_unpruned:.1f}%)"


def _fidelity_cell(row) -> str:
    values = [getattr(row, c, math.nan) for c in FIDELITY_COLUMNS]
    if all(math.isnan(v) for v in values):
        return "—"
    loyalty, top1, kl = ("—" if math.isnan(v) else f"{v:.{d}f}" for v, d in zip(values, (2, 2, 3)))
    return f"{loyalty} / {top1} / {kl}"


def accuracy_section(acc: pd.DataFrame, plots: dict, relative, notes: list[str]) -> list[str]:
    out = ["## Accuracy", ""]
    if acc.empty:
        notes.append("no accuracy rows (metrics.jsonl): run `vtprune eval` or `vtprune sweep ratios`")
        return out + ["No accuracy results.", ""]
    for model, group in acc.groupby("model", sort=True):
        out += [f"### {model}{_mark(group)}", ""]
        columns = task_columns(group)
        for task, metric, _ in columns:
            cell = group[(group["task"] == task) & (group["metric"] == metric)]
            if not cell["scored"].any():
                notes.append(f"{model}, {task} ({metric}): unscored in every run")
            elif not (is_reference(cell) & cell["scored"]).any():
                notes.append(f"{model}, {task} ({metric}): no scored unpruned row (strategy none, keep 1.0): "
                             "scores shown without % of unpruned")
            elif (cell["ref_value"] == 0).all():
                notes.append(f"{model}, {task} ({metric}): the unpruned score is 0, so % of unpruned is undefined "
                             "(no percentages, no plot)")
        tasks = sorted(group["task"].unique())
        header = ["strategy", "keep ratio", "kept fraction", "kept / visual", "equivalent tokens"] + [
            c[2] for c in columns] + [f"{t}: loyalty / top-1 / KL" for t in tasks]
        rows = []
        for (strategy, ratio), point in _order(group).groupby(["strategy", "keep_ratio"], sort=False):
            cells = []
            for task, metric, _ in columns:
                match = point[(point["task"] == task) & (point["metric"] == metric)]
                cells.append(_accuracy_cell(next(match.itertuples())) if len(match) else "—")
            for task in tasks:
                match = point[point["task"] == task]
                cells.append(_fidelity_cell(next(match.itertuples())) if len(match) else "—")
            kept = f"{point['num_kept_mean'].mean():.1f} / {point['num_visual_mean'].mean():.1f}" \
                if point["num_visual_mean"].notna().any() else "—"
            rows.append([strategy, f"{ratio:g}", _fraction_range(point["kept_fraction_mean"]), kept,
                         _number(point["equivalent_tokens_mean"].mean(), 5), *cells])
        out += [markdown_table(header, rows), ""]
        out += [f"![{model} {label}]({relative(path)})" for (m, label), path in plots.items() if m == model]
        out.append("")
    out.append("Cells: score (% of the unpruned score of the same model and task). Kept fraction: achieved kept / "
               "visual tokens (range over tasks). Fidelity to the unpruned run of the same model and task, per sample "
               "and averaged: loyalty (the same answer after lmms-eval's VQA normalisation), top-1 (the same most "
               "likely first token), KL (unpruned ‖ pruned) of the first token's distribution in nats, over the two "
               "top-20 lists with the rest lumped (a lower bound of the full KL).")
    return out + [""]


def _speed_cell(row, column: str) -> str:
    value, ratio = getattr(row, column), getattr(row, f"{column}_ratio")
    if math.isnan(value):
        return "—"
    lo, hi = (getattr(row, f"{column}_ratio{end}", math.nan) for end in ("_lo", "_hi"))
    interval = f"{lo:.2f}–{hi:.2f}" if not (math.isnan(lo) or lo == hi) else ""
    if column in TIMED and row_timing_noisy(row, column):  # its interval is all that can be said
        return f"noisy ({interval}×)" if interval else "noisy"
    text = human_bytes(value) if SPEED_COLUMNS[column][1] == "bytes" else f"{value:.4g} ms"
    if math.isnan(ratio):
        return text
    return f"{text} ({ratio:.2f}×, {interval})" if interval else f"{text} ({ratio:.2f}×)"


def timing_noisy(noisy: bool, rounds, ratio, lo, hi) -> bool:
    """Whether one timing of a bench row is no result: the row is flagged ``noisy`` (its TTFT or its decode interval
    is wider than ±10 %, or it had one round) and this timing's own interval is too wide or missing too. A row
    flagged for its decode step alone still has a TTFT result, and the other way round."""
    if not noisy:
        return False
    values = (rounds, ratio, lo, hi)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values) or rounds < 2:
        return True
    return too_wide(ratio, lo, hi)


def row_timing_noisy(row, column: str) -> bool:
    return timing_noisy(row.noisy, getattr(row, "rounds", math.nan),
                        *(getattr(row, f"{column}_ratio{end}", math.nan) for end in ("", "_lo", "_hi")))


def ideal_cell(row, column: str, ideal: str) -> str:
    """``column``'s measured / ideal speed-up cell of a bench row (attributes: a report row, or a bench.jsonl row as
    a namespace)."""
    return speedup_cell(getattr(row, f"{column}_ratio"), getattr(row, ideal), row_timing_noisy(row, column))


def speedup_cell(ratio, ideal, noisy: bool) -> str:
    """Measured speed-up (1 / time ratio) / ideal speed-up (efficiency), e.g. ``1.60× / 2.05× (78 %)``."""
    def missing(value):
        return value is None or math.isnan(value)

    if missing(ideal):
        return "—"
    if noisy:  # the measured figure is no result; the ideal, computed, still is
        return f"noisy / {ideal:.2f}×"
    if missing(ratio) or ratio <= 0:
        return f"— / {ideal:.2f}×"
    speedup = 1 / ratio
    return f"{speedup:.2f}× / {ideal:.2f}× ({100 * speedup / ideal:.0f} %)"


def _where(row) -> str:
    return f"{row.model} ({row.device}, {row.dtype}), batch size {row.batch_size}, {row.strategy} @ {row.keep_ratio:g}"


def _padding_note(row) -> str:
    return (f"{_where(row)}: kept counts differ per sample; {100 * row.kept_padding:.0f} % of the batch's kept-token "
            "slots were padding, which its timings and ideal include")


def _noisy_note(row) -> str:
    where = _where(row)
    rounds = getattr(row, "rounds", math.nan)
    if rounds < 2:
        why = "one timed round gives no interval"
    else:
        intervals = {SPEED_COLUMNS[c][0]: [getattr(row, f"{c}_ratio{end}") for end in ("", "_lo", "_hi")]
                     for c in ("ttft_ms", "decode_ms_per_token")}  # the two that decide ``noisy``
        wide = [f"{name} {lo:.2f}–{hi:.2f}×" for name, (ratio, lo, hi) in intervals.items() if too_wide(ratio, lo, hi)]
        why = "ratio interval wider than ±10 % (" + ", ".join(wide) + ")"
    return (f"{where}: timings noisy, {why}; each timing with so wide an interval is shown as 'noisy', not as a "
            "result — rerun with more `bench.repeats` "
            "or on a quieter machine")


def _threads(batch: pd.DataFrame) -> str:
    """`` (2 CPU threads)``: the measurement's torch threads (rows before ``bench.threads`` have none)."""
    counts = sorted({int(t) for t in batch.get("threads", pd.Series(dtype=float)).dropna()})
    if not counts:
        return ""
    return f" ({'/'.join(map(str, counts))} CPU thread{'s' if counts != [1] else ''})"


def speed_section(speed: pd.DataFrame, plots: dict, relative, notes: list[str]) -> list[str]:
    out = ["## Speed, memory, KV cache", ""]
    if speed.empty:
        notes.append("no speed rows (bench.jsonl): run `vtprune bench`")
        return out + ["No benchmark results.", ""]
    for (model, device, dtype), group in speed.groupby(["model", "device", "dtype"], sort=True):
        out += [f"### {model} — {device}, {dtype}{_mark(group)}", ""]
        header = ["strategy", "keep ratio", "kept fraction"] + [SPEED_COLUMNS[c][0] for c in SPEED_COLUMNS] + [
            name for name, _ in IDEAL_COLUMNS.values()]
        for batch_size, batch in group.groupby("batch_size", sort=True):
            if not is_reference(batch).any():
                notes.append(f"{model} ({device}, {dtype}), batch size {batch_size}: no unpruned row "
                             "(strategy none, keep 1.0): figures shown without ratios")
            rows = [[row.strategy, f"{row.keep_ratio:g}", _fraction_range(pd.Series([row.kept_fraction_mean])),
                     *(_speed_cell(row, c) for c in SPEED_COLUMNS),
                     *(ideal_cell(row, c, ideal) for c, (_, ideal) in IDEAL_COLUMNS.items())]
                    for row in _order(batch).itertuples()]
            notes += [_noisy_note(row) for row in _order(batch).itertuples() if row.noisy]
            # rows from before the column read NaN, which is not > 0
            notes += [_padding_note(row) for row in _order(batch).itertuples() if getattr(row, "kept_padding", 0) > 0]
            out += [f"Batch size {batch_size}{_threads(batch)}:", "", markdown_table(header, rows), ""]
        out += [f"![{model} {strategy}]({relative(path)})" for (m, d, t, strategy), path in plots.items()
                if (m, d, t) == (model, device, dtype)]
        out.append("")
    out.append("Each figure is a median; (n×) is its ratio to the unpruned point of its own bench (else the newest one of the same model and batch size) "
               "(below 1 is faster / smaller). Timings measured in interleaved rounds: (n×, lo–hi) is the median of "
               "the per-round ratios to the unpruned run of the same round, with its 95 % bootstrap interval; "
               "'noisy': in a row whose TTFT or decode interval is wider than ±10 % (see Notes), each timing whose own "
               "interval is that wide too. "
               "KV cache: self- plus cross-attention cache measured after generation. ×ideal: measured speed-up "
               "(1 / the time ratio) / the ideal speed-up for the same work (efficiency): FLOPs of the vision tower, "
               "projector and prefill for TTFT, bytes read per step (language-model weights + KV cache after "
               "prefill) for decode, both from the model's config.")
    return out + [""]


def flagged(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].fillna(False).astype(bool).any()


def _mark(group: pd.DataFrame) -> str:
    """The label a model's tables carry: tiny random models give smoke figures, micro models micro-model figures."""
    return "".join(f" — {mark}" for column, mark in (("smoke", SMOKE_MARK), ("micro", MICRO_MARK))
                   if flagged(group, column))
