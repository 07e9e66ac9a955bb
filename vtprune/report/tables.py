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


def reference_point(strategy: str, keep_ratio: float) -> bool:
    return strategy == "none" and abs(float(keep_ratio) - 1.0) < 1e-9


def is_reference(frame: pd.DataFrame) -> pd.Series:
    return pd.Series([reference_point(s, r) for s, r in zip(frame["strategy"], frame["keep_ratio"])],
                     index=frame.index, dtype=bool)


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

    The unpruned reference of a row is the one measured in its own run (same folder, batch size and threads), looked
    up in ``every_row`` (the bench rows before a rerun's rows replaced older ones): an interleaved bench times both
    in the same rounds, and a figure against another bench's ``none`` would compare two machines' moods. A row
    whose run has no unpruned point gets no reference and no ratio. A timing's ratio is the row's own paired ratio
    (with ``_lo`` / ``_hi``) where the bench measured one, else the ratio of the medians."""
    if bench.empty:
        return bench
    b = _with_figures(bench)
    rows = b if every_row is None or every_row.empty else _with_figures(every_row)
    key = [k for k in (*_SPEED_KEY, "threads", "run_dir") if k in b.columns and k in rows.columns]
    own = rows[is_reference(rows)][[*key, *SPEED_COLUMNS]].drop_duplicates(key, keep="last")
    b = b.merge(own.rename(columns={c: f"{c}_ref" for c in SPEED_COLUMNS}), on=key, how="left")
    for column in SPEED_COLUMNS:
        ref_value = b[f"{column}_ref"]
        paired = _numeric(b, f"{column}_ratio").where(ref_value.notna())
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
    """The accuracy, speed and serving rows in one long table (``kind`` says which), for ``--format csv|json``."""
    parts = [frame.assign(kind=kind) for kind, frame in
             (("accuracy", accuracy_frame(results.metrics, results.samples)),
              ("speed", speed_frame(results.bench, results.bench_rows)),
              ("serve", serve_frame(results.serve, results.serve_rows))) if not frame.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["kind"])


# -- formatting ------------------------------------------------------------------------------------------------


def human_bytes(*values: float) -> str:
    """Byte counts in the unit of the largest, e.g. ``669.40 → 669.42 MiB``."""
    if any(v is None or math.isnan(v) for v in values):
        return "—"
    for power, unit in enumerate(("B", "KiB", "MiB", "GiB", "TiB")):
        if max(abs(v) for v in values) < 1024 ** (power + 1) or unit == "TiB":
            digits = 0 if unit == "B" else 2
            return " → ".join(f"{v / 1024 ** power:.{digits}f}" for v in values) + f" {unit}"
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


def accuracy_section(acc: pd.DataFrame, plots: dict, relative, notes: list[str], flags: dict) -> list[str]:
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
            fraction = _kept_cell(point["kept_fraction_mean"], ratio)
            if unequal_budget(point["kept_fraction_mean"], ratio):
                _flag(flags, "budget", model, f"{strategy} {ratio:g}")  # its kept fraction is in the tables
            rows.append([strategy, f"{ratio:g}", fraction, kept,
                         _number(point["equivalent_tokens_mean"].mean(), 5), *cells])
        out += [markdown_table(header, rows), ""]
        out += [f"![{model} {label}]({relative(path)})" for (m, label), path in plots.items() if m == model]
        out.append("")
    out.append("Cells: score (% of the unpruned score of the same model and task). Kept fraction: achieved kept / "
               "visual tokens (range over tasks); '(target r)' beside it: more than "
               f"{100 * BUDGET_TOLERANCE:.0f} % away from the keep ratio r, so the row is not comparable with the others "
               "at r. Fidelity to the unpruned run of the same model and task, per sample "
               "and averaged: loyalty (the same answer after lmms-eval's VQA normalisation), top-1 (the same most "
               "likely first token), KL (unpruned ‖ pruned) of the first token's distribution in nats, over the two "
               "top-20 lists with the rest lumped (a lower bound of the full KL).")
    return out + [""]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def timing_status(rounds, ratio, lo, hi) -> str:
    """What one paired timing ratio of a bench row is worth: ``missing`` (no ratio), ``noisy`` (one round, or a 95 %
    interval wider than ±10 %: no result), ``few rounds`` (two rounds: a ratio, but no interval worth the name),
    ``no interval`` (a bench from before interleaving: the ratio of two medians) or ``ok``. Judged per timing, so a
    row flagged for its decode step keeps its TTFT, and an e2e interval too wide is caught whatever the row says."""
    if _missing(ratio):
        return "missing"
    if not _missing(rounds) and rounds < 2:
        return "noisy"
    if _missing(lo) or _missing(hi):
        return "no interval"
    if too_wide(ratio, lo, hi):
        return "noisy"
    return "few rounds" if not _missing(rounds) and rounds < 3 else "ok"


def row_timing_status(row, column: str) -> str:
    return timing_status(getattr(row, "rounds", math.nan),
                         *(getattr(row, f"{column}_ratio{end}", math.nan) for end in ("", "_lo", "_hi")))


def ideal_cell(row, column: str, ideal: str) -> str:
    """``column``'s measured / ideal speed-up cell of a bench row (attributes: a report row, or a bench.jsonl row as
    a namespace)."""
    return speedup_cell(getattr(row, f"{column}_ratio"), getattr(row, ideal), row_timing_status(row, column) == "noisy")


ABOVE_IDEAL = 105  # % of the ideal speed-up beyond which a measured one says more about the reference than pruning


def speedup_cell(ratio, ideal, noisy: bool) -> str:
    """Measured speed-up (1 / time ratio) / ideal speed-up (efficiency), e.g. ``1.60× / 2.05× (78 %)``."""
    if _missing(ideal):
        return "—"
    if noisy:  # the measured figure is no result; the ideal, computed, still is
        return f"noisy / {ideal:.2f}×"
    if _missing(ratio) or ratio <= 0:
        return f"— / {ideal:.2f}×"
    percent = percent_of_ideal(ratio, ideal)
    flag = ", above ideal" if percent > ABOVE_IDEAL else ""
    return f"{1 / ratio:.2f}× / {ideal:.2f}× ({percent} %{flag})"


def percent_of_ideal(ratio, ideal) -> int | None:
    """The measured speed-up (1 / time ratio) as a whole percentage of the ideal one; None where either is missing."""
    if _missing(ratio) or _missing(ideal) or ratio <= 0:
        return None
    return round(100 / ratio / ideal)


def _times(*values: float) -> str:
    """Milliseconds in one unit for all: seconds from 1 s on, so 98 630 ms reads 98.6 s, not 9.863e+04 ms."""
    if max(values) >= 1000:
        digits = 1 if max(values) >= 10_000 else 2
        return " → ".join(f"{v / 1000:.{digits}f}" for v in values) + " s"
    return " → ".join(f"{v:.3g}" for v in values) + " ms"


def _speed_cell(row, column: str) -> str:
    """``none → pruned (ratio, interval)`` of the row's own bench; a reference row, or a row whose run measured no
    unpruned point, shows its figure alone."""
    value, ref = (getattr(row, f"{column}{end}") for end in ("", "_ref"))
    if math.isnan(value):
        return "—"
    bytes_ = SPEED_COLUMNS[column][1] == "bytes"
    if reference_point(row.strategy, row.keep_ratio) or math.isnan(ref):
        return human_bytes(value) if bytes_ else _times(value)
    pair = human_bytes(ref, value) if bytes_ else _times(ref, value)
    if column not in TIMED:
        return f"{pair} ({getattr(row, f'{column}_ratio'):.2f}×)"
    ratio, lo, hi = (getattr(row, f"{column}_ratio{end}") for end in ("", "_lo", "_hi"))
    return paired_cell(pair, ratio, lo, hi, row_timing_status(row, column), getattr(row, "rounds", math.nan))


def paired_cell(pair: str, ratio, lo, hi, status: str, rounds) -> str:
    """``pair, n× (lo–hi)`` for a paired ratio (or speed-up) whose ``timing_status`` is ``status``; a noisy one shows
    its interval alone, ``noisy (lo–hi×)`` or ``noisy (one round)``."""
    if status == "noisy":  # its interval is all that can be said
        one = rounds < 2 or _missing(lo)  # NaN rounds compare False
        return "noisy (one round)" if one else f"noisy ({lo:.2f}–{hi:.2f}×)"
    why = (f"{lo:.2f}–{hi:.2f}" if status == "ok" else "medians, no interval" if status == "no interval" else
           f"{rounds:.0f} rounds: no interval")
    return f"{pair}, {ratio:.2f}× ({why})"


BUDGET_TOLERANCE = 0.2  # an achieved kept fraction further than this share of its keep ratio is another budget


def unequal_budget(kept: pd.Series, target: float) -> bool:
    """Whether any achieved kept fraction of a point is another budget than its keep ratio asked for."""
    return any(abs(k - target) > BUDGET_TOLERANCE * target for k in kept.dropna())


def _kept_cell(kept: pd.Series, target: float) -> str:
    """The achieved kept fraction, ``(target r)`` beside it when it is another budget than its keep ratio."""
    text = _fraction_range(kept)
    return f"{text} (target {target:g})" if unequal_budget(kept, target) else text


GROUPED = {  # kind of note → its one line's text, before the points it lists
    "noisy": "timings shown as 'noisy', not as results (95 % interval wider than ±10 % of the ratio, or one round; "
             "rerun with more `bench.repeats` or on a quieter machine)",
    "few rounds": "ratios from two timed rounds, shown without an interval (a weak result; bench with "
                  "`bench.repeats` ≥ 3)",
    "above ideal": f"measured speed-up above {ABOVE_IDEAL} % of the ideal: more than the work saved explains (a "
                   "device that runs the smaller shapes faster, or a reference slowed by something else); check "
                   "before quoting it",
    "budget": f"achieved kept fraction more than {100 * BUDGET_TOLERANCE:.0f} % away from the keep ratio (not "
              "comparable with other rows at the same keep ratio)",
    "padding": "kept counts differed per sample: share of the batch's kept-token slots that were padding, which "
               "the timings and the ideal include",
    "no reference": "no unpruned point in the row's own bench: figures shown without ratios",
    "serve noisy": "serving speed-ups shown as 'noisy', not as results (95 % interval wider than ±10 % of the "
                   "speed-up, or one round; rerun `vtprune serve-bench` with more `--rounds` or on a quieter machine)",
    "serve few rounds": "serving speed-ups from two rounds, shown without an interval (a weak result; "
                        "`vtprune serve-bench --rounds` ≥ 3)",
}


def grouped_notes(flags: dict[str, dict[str, list[str]]]) -> list[str]:
    """One note per kind: ``text: where: point, point — where: point``."""
    return [GROUPED[kind] + ": " + " — ".join(f"{where}: {', '.join(points)}" for where, points in places.items())
            for kind, places in flags.items() if places]


def _flag(flags: dict, kind: str, where: str, point: str) -> None:
    points = flags.setdefault(kind, {}).setdefault(where, [])
    if point not in points:
        points.append(point)


SHORT = {"ttft_ms": "TTFT", "decode_ms_per_token": "decode", "e2e_ms": "e2e"}


def _flag_timings(flags: dict, where: str, point: str, statuses: dict[str, str], ideals: list[tuple],
                  kinds: tuple[str, str] = ("noisy", "few rounds")) -> None:
    """The grouped notes of one row's paired timings: ``statuses`` short name → ``timing_status``; ``ideals``:
    (short name, time ratio, ideal speed-up) of each timing that has an ideal; ``kinds``: the noisy and the
    two-round kind of note."""
    noisy = [name for name, status in statuses.items() if status == "noisy"]
    if noisy:
        _flag(flags, kinds[0], where, f"{point} ({', '.join(noisy)})")
    if any(status == "few rounds" for status in statuses.values()):
        _flag(flags, kinds[1], where, point)
    above = [name for name, ratio, ideal in ideals if statuses[name] not in ("noisy", "missing")
             and (percent_of_ideal(ratio, ideal) or 0) > ABOVE_IDEAL]
    if above:
        _flag(flags, "above ideal", where, f"{point} ({', '.join(above)})")


def _flag_row(flags: dict, place: str, row, threads: str = "") -> None:
    """Every grouped note a bench row belongs under."""
    where = f"{place}, batch {row.batch_size}" + (f", {threads}" if threads else "")
    point = f"{row.strategy} {row.keep_ratio:g}"
    statuses = {column: row_timing_status(row, column) for column in TIMED}
    _flag_timings(flags, where, point, {SHORT[c]: status for c, status in statuses.items()},
                  [(SHORT[c], getattr(row, f"{c}_ratio"), getattr(row, ideal)) for c, (_, ideal) in IDEAL_COLUMNS.items()])
    if unequal_budget(pd.Series([row.kept_fraction_mean]), row.keep_ratio):
        _flag(flags, "budget", place, point)
    if getattr(row, "kept_padding", 0) > 0:  # rows from before the column read NaN, which is not > 0
        _flag(flags, "padding", where, f"{point} {100 * row.kept_padding:.0f} %")
    if math.isnan(row.ttft_ms_ref) and not reference_point(row.strategy, row.keep_ratio):
        _flag(flags, "no reference", where, point)


def _blocks(group: pd.DataFrame):
    """(batch size, threads, rows) per table: a bench at another thread count is another measurement."""
    threads = group["threads"] if "threads" in group.columns else pd.Series(float("nan"), index=group.index)
    for (batch_size, count), rows in group.assign(_threads=threads).groupby(["batch_size", "_threads"], sort=True,
                                                                                dropna=False):
        yield batch_size, count, rows.drop(columns="_threads")


def _threads(count, several: bool = False) -> str:
    """`` (2 CPU threads)``: the measurement's torch threads (rows before ``bench.threads`` have none, which only
    needs saying beside a table of the same batch size that has)."""
    if _missing(count):
        return " (CPU threads not recorded)" if several else ""
    return f" ({count:.0f} CPU thread{'s' if count != 1 else ''})"


def plot_links(plots: dict, where: tuple, relative) -> list[str]:
    """The markdown images of the plots drawn for ``where`` (model, device, dtype), keyed ``(*where, label)``."""
    return [f"![{key[0]} {key[-1]}]({relative(path)})" for key, path in plots.items() if key[:-1] == where]


def speed_section(speed: pd.DataFrame, plots: dict, relative, notes: list[str], flags: dict) -> list[str]:
    out = ["## Speed, memory, KV cache", ""]
    if speed.empty:
        notes.append("no speed rows (bench.jsonl): run `vtprune bench`")
        return out + ["No benchmark results.", ""]
    header = ["strategy", "keep ratio", "kept fraction"] + [f"{SPEED_COLUMNS[c][0]}: none → pruned" for c in
                                                            SPEED_COLUMNS] + [name for name, _ in IDEAL_COLUMNS.values()]
    combos = speed.groupby("model")[["device", "dtype"]].nunique().max(axis=1)
    for (model, device, dtype), group in speed.groupby(["model", "device", "dtype"], sort=True):
        out += [f"### {model} — {device}, {dtype}{_mark(group)}", ""]
        where = model if combos[model] == 1 else f"{model} ({device}, {dtype})"
        blocks = list(_blocks(group))
        for batch_size, threads, batch in blocks:
            pruned = batch[~is_reference(batch)]
            shown = _order(pruned if not pruned.empty else batch)
            several = sum(b == batch_size for b, _, _ in blocks) > 1  # benches at other thread counts beside it
            for row in shown.itertuples():
                _flag_row(flags, where, row, _threads(threads).strip(" ()") if several else "")
            rows = [[row.strategy, f"{row.keep_ratio:g}", _kept_cell(pd.Series([row.kept_fraction_mean]), row.keep_ratio),
                     *(_speed_cell(row, c) for c in SPEED_COLUMNS),
                     *(ideal_cell(row, c, ideal) for c, (_, ideal) in IDEAL_COLUMNS.items())]
                    for row in shown.itertuples()]
            out += [f"Batch size {batch_size}{_threads(threads, several)}:", "", markdown_table(header, rows), ""]
        out += [*plot_links(plots, (model, device, dtype), relative), ""]
    out.append("Engine: `hf` (Hugging Face `generate`, one batch at a time) for every table of this section. "
               "Each row is one pruned point against the unpruned (`none`, keep 1.0) point of its own bench, measured "
               "in the same interleaved rounds: `none → pruned` medians, then (n×, lo–hi): the median of the "
               "per-round ratios pruned / none with its 95 % bootstrap interval (below 1 is faster / smaller). "
               "'noisy (lo–hi×)': that timing's interval is wider than ±10 % of its ratio, or it had one round — no "
               "result; '(2 rounds: no interval)': a ratio from two rounds, too few for an interval. "
               "KV cache: self- plus cross-attention cache measured after generation. ×ideal: measured speed-up "
               "(1 / the time ratio) / the ideal speed-up for the same work (efficiency): FLOPs of the vision tower, "
               f"projector and prefill for TTFT, bytes read per step (language-model weights + KV cache after "
               f"prefill) for decode, both from the model's config; 'above ideal': more than {ABOVE_IDEAL} % of it. "
               "'(target r)' beside a kept fraction: the strategy kept more than "
               f"{100 * BUDGET_TOLERANCE:.0f} % more or fewer tokens than its keep ratio r asks, so the row is not "
               "comparable with the others at r. Every flag is listed under Notes.")
    return out + [""]


# -- serving under load (vtprune serve-bench) --------------------------------------------------------------------

SERVE_COLUMNS = {  # serve column → (table header, unit); each has a paired speed-up in the row
    "req_per_s": ("req/s", "/s"),
    "ttft_p50_ms": ("TTFT p50", "ms"),
    "ttft_p99_ms": ("TTFT p99", "ms"),
    "itl_ms": ("per-token", "ms"),
}
SERVE_IDEAL = {  # serve column → (table header, serve column of its ideal speed-up from the token counts)
    "req_per_s": ("req/s ×ideal", "ideal_throughput_speedup"),
    "ttft_p50_ms": ("TTFT ×ideal", "ideal_ttft_speedup"),
}
SERVE_COMPUTE_IDEAL = {  # the same against the ideal from the compute, the vision tower counted (older runs: none)
    "req_per_s": ("req/s ×compute ideal", "ideal_compute_throughput_speedup"),
    "ttft_p50_ms": ("TTFT ×compute ideal", "ideal_compute_ttft_speedup"),
}
_SERVE_NUMERIC = ("concurrency", "rounds", "requests", "num_visual", "num_kept", "prompt_tokens", "prompt_tokens_none",
                  "output_tokens", "kv_blocks_per_request", "kv_blocks_per_request_none", "kv_peak_usage", "block_size",
                  "out_tok_per_s", "e2e_p50_ms", "ideal_ttft_speedup", "ideal_throughput_speedup",
                  "req_per_s_efficiency", "ttft_p50_ms_efficiency", "ideal_compute_throughput_speedup",
                  "ideal_compute_ttft_speedup")


def serve_frame(serve: pd.DataFrame, every_row: pd.DataFrame | None = None) -> pd.DataFrame:
    """serve rows + ``<figure>_none``: the unpruned figure of the row's own run at the same concurrency (looked up in
    ``every_row``, the rows before a rerun replaced older ones), the other side of the paired speed-up the row
    carries (``<figure>_speedup``, ``_lo``, ``_hi``: above 1 is better, throughput and latency alike)."""
    if serve.empty:
        return serve
    s = _serve_figures(serve)
    rows = s if every_row is None or every_row.empty else _serve_figures(every_row)
    key = [k for k in ("model", "engine", "device", "dtype", "concurrency", "run_dir") if k in s.columns
           and k in rows.columns]
    own = rows[is_reference(rows)][[*key, *SERVE_COLUMNS]].drop_duplicates(key, keep="last")
    return s.merge(own.rename(columns={c: f"{c}_none" for c in SERVE_COLUMNS}), on=key, how="left")


def _serve_figures(serve: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``serve`` with every figure numeric (NaN where a row lacks one: itl null, a ``none`` row's
    speed-ups)."""
    s = serve.copy()
    for column in (*_SERVE_NUMERIC, *SERVE_COLUMNS):
        s[column] = _numeric(s, column)
    for column in SERVE_COLUMNS:
        for end in ("", "_lo", "_hi"):
            s[f"{column}_speedup{end}"] = _numeric(s, f"{column}_speedup{end}")
    return s


def serve_status(row, column: str) -> str:
    """``timing_status`` of a serve row's paired speed-up: judged by the report as the speed tables' are."""
    return timing_status(getattr(row, "rounds", math.nan),
                         *(getattr(row, f"{column}_speedup{end}", math.nan) for end in ("", "_lo", "_hi")))


def _rates(*values: float) -> str:
    return " → ".join(f"{v:.3g}" for v in values)


def _tokens(*values: float) -> str:
    return " → ".join(f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values)


def _serve_cell(row, column: str) -> str:
    """``none → pruned, n× (lo–hi)`` with the row's own paired speed-up; a reference row shows its figure alone."""
    value, none = getattr(row, column), getattr(row, f"{column}_none", math.nan)
    if math.isnan(value):
        return "—"
    show = _times if SERVE_COLUMNS[column][1] == "ms" else _rates
    if reference_point(row.strategy, row.keep_ratio) or math.isnan(none):
        return show(value)
    status = serve_status(row, column)
    if status == "missing":
        return show(none, value)
    speedup, lo, hi = (getattr(row, f"{column}_speedup{end}") for end in ("", "_lo", "_hi"))
    return paired_cell(show(none, value), speedup, lo, hi, status, row.rounds)


def _inverse(value) -> float:
    """A speed-up as the time ratio the speed helpers read (1 / speed-up)."""
    return math.nan if _missing(value) or value <= 0 else 1 / value


def serve_ideal_cell(row, column: str, ideals: dict = SERVE_IDEAL) -> str:
    ideal = getattr(row, ideals[column][1], math.nan)
    if reference_point(row.strategy, row.keep_ratio) or _missing(ideal):
        return "—"
    return speedup_cell(_inverse(getattr(row, f"{column}_speedup")), ideal, serve_status(row, column) == "noisy")


def _pair_or_one(none, pruned, show) -> str:
    if _missing(pruned):
        return "—"
    return show(pruned) if _missing(none) or none == pruned else show(none, pruned)


SERVE_SHORT = {"req_per_s": "req/s", "ttft_p50_ms": "TTFT p50", "ttft_p99_ms": "TTFT p99", "itl_ms": "per-token"}


def _flag_serve_row(flags: dict, place: str, row) -> None:
    """Every grouped note a serve row belongs under."""
    where = f"{place}, {row.concurrency:.0f} client{'s' if row.concurrency != 1 else ''}"
    point = f"{row.strategy} {row.keep_ratio:g}"
    _flag_timings(flags, where, point, {SERVE_SHORT[c]: serve_status(row, c) for c in SERVE_COLUMNS},
                  [(SERVE_SHORT[c], _inverse(getattr(row, f"{c}_speedup")), getattr(row, ideal))
                   for c, (_, ideal) in SERVE_IDEAL.items()], kinds=("serve noisy", "serve few rounds"))


def _serve_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Strategies by name, keep ratios from high to low, then the load from low to high: a plan's rows read as its
    curve against concurrency."""
    return frame.sort_values(["strategy", "keep_ratio", "engine", "concurrency"], ascending=[True, False, True, True],
                             kind="stable")


def serve_section(serve: pd.DataFrame, plots: dict, relative, notes: list[str], flags: dict) -> list[str]:
    """Per model × device × dtype, one table of every pruned plan at every concurrency against the unpruned plan of
    its own run (none when there are no serve rows: the section is left out)."""
    if serve.empty:
        return []
    out = ["## Serving under load (vLLM)", ""]
    header = ["engine", "strategy", "keep ratio", "visual kept", "clients", "prompt tokens",
              *(f"{SERVE_COLUMNS[c][0]}: none → pruned" for c in SERVE_COLUMNS), "KV blocks / request",
              *(name for name, _ in SERVE_IDEAL.values()), *(name for name, _ in SERVE_COMPUTE_IDEAL.values())]
    serve = serve.assign(engine=serve["engine"] if "engine" in serve.columns else "vllm")
    combos = serve.groupby("model")[["device", "dtype"]].nunique().max(axis=1)
    for (model, device, dtype), group in serve.groupby(["model", "device", "dtype"], sort=True):
        out += [f"### {model} — {device}, {dtype}{_mark(group)}", ""]
        place = f"{model} (serving)" if combos[model] == 1 else f"{model} (serving, {device}, {dtype})"
        pruned = group[~is_reference(group)]
        shown = _serve_order(pruned if not pruned.empty else group)
        rows = []
        for row in shown.itertuples():
            _flag_serve_row(flags, place, row)
            kept = "—" if _missing(row.num_visual) else f"{row.num_kept:.0f} / {row.num_visual:.0f}"
            rows.append([row.engine, row.strategy, f"{row.keep_ratio:g}", kept, f"{row.concurrency:.0f}",
                         _pair_or_one(row.prompt_tokens_none, row.prompt_tokens, _tokens),
                         *(_serve_cell(row, c) for c in SERVE_COLUMNS),
                         _pair_or_one(row.kv_blocks_per_request_none, row.kv_blocks_per_request, _tokens),
                         *(serve_ideal_cell(row, c) for c in SERVE_IDEAL),
                         *(serve_ideal_cell(row, c, SERVE_COMPUTE_IDEAL) for c in SERVE_COMPUTE_IDEAL)])
        blocks = sorted(group["block_size"].dropna().unique())
        rounds = sorted(group["rounds"].dropna().unique())
        plural = "s" if rounds != [1] else ""
        facts = [f"{', '.join(f'{r:.0f}' for r in rounds)} paired round{plural}"] if rounds else []
        facts += [f"KV blocks of {', '.join(f'{b:.0f}' for b in blocks)} tokens"] if blocks else []
        out += [", ".join(facts) + ":", ""] if facts else []
        out += [markdown_table(header, rows), ""]
        out += [*plot_links(plots, (model, device, dtype), relative), ""]
    out.append("Measured by `vtprune serve-bench` on one vLLM engine per run: a closed loop of C clients (*clients*), "
               "each sending its next request as soon as the last one finished, every pruned plan and the unpruned "
               "one (`none`, keep 1.0) visited in each round at each C, interleaved. `none → pruned`: the medians "
               "over rounds, then (n×, lo–hi): the median of the per-round speed-ups against the unpruned visit of "
               "the same round with its 95 % bootstrap interval — a **speed-up, above 1 is better** for throughput "
               "and latency alike (unlike the time ratios of the speed tables). TTFT p50 / p99: percentiles of the "
               "time to the first token over a visit's requests; per-token: the median time between output tokens. "
               "*Prompt tokens*: the mean prompt length as the engine saw it (visual tokens kept included); "
               "*KV blocks / request*: the blocks one request's prompt and output fill. ×ideal: measured speed-up / "
               "the ideal from the token counts alone (efficiency) — throughput: (prompt + output tokens) unpruned / "
               "pruned, TTFT: prompt tokens unpruned / pruned; ×compute ideal: the same against the ideal from the "
               "compute (FLOPs), the vision tower counted, which runs whatever is pruned after it, and each output "
               "token costed as one token through the weights; 'above ideal': more than "
               f"{ABOVE_IDEAL} % of it. Flags as in the speed tables: 'noisy (lo–hi×)': interval wider than ±10 % of "
               "the speed-up, or one round — no result; '(2 rounds: no interval)': a speed-up from two rounds. Every "
               "flag is listed under Notes.")
    return out + [""]


def flagged(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].fillna(False).astype(bool).any()


def _mark(group: pd.DataFrame) -> str:
    """The label a model's tables carry: tiny random models give smoke figures, micro models micro-model figures."""
    return "".join(f" — {mark}" for column, mark in (("smoke", SMOKE_MARK), ("micro", MICRO_MARK))
                   if flagged(group, column))
