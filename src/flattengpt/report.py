"""The results table, its plots and the sample generations of every evaluated model.

Everything here is a pure function of files the evaluation stages wrote (model.json, plan.json,
compression.json, one JSON per perplexity corpus, zero-shot task, speed run and generation run),
so the report can be rebuilt and tested without Snakemake. A missing file or field becomes NaN in
the table, never an error: a report with holes is more useful than none.

A recovered model (method `{source}+{recovery}`, entry field `recovered_from`) is a row of its own,
sorted right below its source, and `recovery_table` lists its change against that source (same
model, calibration and target) in every numeric column.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .plots import _save, heatmap
from .provenance import atomic_path, read_json

PAPER_TASKS = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]

NAN = float("nan")
SPEEDUPS = ("prefill_speedup", "decode_speedup", "ideal_speedup")
INFERENCE = ("prefill_tokens_per_s", "decode_ms_per_token", "kv_cache_bytes_per_token", "peak_memory_mib")
INT_COLUMNS = ("blocks_removed", "num_layers", "parameters", "n_tasks", "recovery_steps")
MB = 1e6


# ----------------------------------------------------------------------------- reading inputs


def _read(path: str | Path | None) -> dict:
    """The JSON at `path`, or {} when there is no path or no file (the value becomes NaN)."""
    if path is None or not Path(path).is_file():
        return {}
    return read_json(path)


def _get(record: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(record, dict) or record.get(key) is None:
            return None
        record = record[key]
    return record


def _float(value: Any) -> float:
    try:
        return NAN if value is None else float(value)
    except (TypeError, ValueError):
        return NAN


def _safetensors(directory: str | Path | None) -> list[Path]:
    if directory is None or not Path(directory).is_dir():
        return []
    return sorted(Path(directory).glob("*.safetensors"))


def checkpoint_parameters(directory: str | Path | None) -> int | None:
    """Parameters stored in a checkpoint: numel summed over the safetensors headers (no tensor is read).

    Tied weights are saved once by `save_pretrained`, so this counts what the model really holds.
    """
    from safetensors import safe_open

    files = _safetensors(directory)
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def size_on_disk_mb(directory: str | Path | None) -> float:
    files = _safetensors(directory)
    return sum(file.stat().st_size for file in files) / MB if files else NAN


def variant_label(entry: dict) -> str:
    """"dense" (or "dense+recovery"), or "method / target / calibration" for a compressed model."""
    if entry.get("method") == "dense":
        return "dense"
    return " / ".join(str(part) for part in (entry.get("method"), entry.get("target"), entry.get("calibration"))
                      if part is not None)


# ----------------------------------------------------------------------------- the table


def _task_order(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [task for task in PAPER_TASKS if task in tasks] + sorted(tasks - set(PAPER_TASKS))


def _row(entry: dict, corpora: list[str], tasks: list[str]) -> dict:
    model = _read(entry.get("model_json"))
    dense = entry.get("method") == "dense"
    recovered_from = entry.get("recovered_from")
    dense_like = dense or recovered_from == "dense"  # the dense model, or the dense model recovery-tuned
    compression = {} if dense_like else _read(entry.get("compression_json"))
    plan = {} if dense_like else _read(entry.get("plan_json"))
    speed = {} if dense_like else _read(entry.get("speed"))
    recovery = _read(entry.get("recovery_json")) if recovered_from else {}

    per_block = _get(model, "parameters", "per_block")
    dense_layers = model.get("num_layers") or (len(per_block) if per_block else None)
    dense_parameters = _get(model, "parameters", "total")
    if dense:
        blocks_removed, num_layers, parameters = 0, dense_layers, dense_parameters
        model_dir = entry.get("model_dir") or model.get("path")
    elif dense_like:  # merged LoRA (or full fine-tune): the dense architecture, its own weights
        blocks_removed, num_layers = 0, dense_layers
        model_dir = entry.get("model_dir")
        parameters = checkpoint_parameters(model_dir)
        if parameters is None:
            parameters = dense_parameters
    else:
        layers = compression.get("num_layers") if isinstance(compression.get("num_layers"), dict) else {}
        num_layers = (layers.get("compressed") or _get(speed, "models", "compressed", "num_layers")
                      or (plan["num_layers"] - plan["remove_blocks"] if "remove_blocks" in plan else None))
        original = layers.get("original") or plan.get("num_layers") or dense_layers
        blocks_removed = original - num_layers if original is not None and num_layers is not None else None
        model_dir = entry.get("model_dir")
        parameters = checkpoint_parameters(model_dir)
        if parameters is None:
            parameters = plan.get("params_after")

    row = {"model": entry.get("model"), "calibration": entry.get("calibration"), "method": entry.get("method"),
           "recovered_from": recovered_from, "target": entry.get("target"), "blocks_removed": blocks_removed, "num_layers": num_layers,
           "parameters": parameters,
           "param_ratio": _float(parameters) / _float(dense_parameters) if dense_parameters else NAN}

    perplexity = entry.get("perplexity") or {}
    for corpus in corpora:
        row[f"ppl_{corpus}"] = _float(_read(perplexity.get(corpus)).get("perplexity"))

    zero_shot = entry.get("zero_shot") or {}
    for task in tasks:
        record = _read(zero_shot.get(task))
        row[task] = 100 * _float(record.get("value"))
        row[f"{task}_stderr"] = 100 * _float(record.get("stderr"))
    accuracies = [row[task] for task in tasks if math.isfinite(row[task])]
    row["mean_acc"] = float(np.mean(accuracies)) if accuracies else NAN
    row["n_tasks"] = len(accuracies)
    row["retention"] = NAN  # needs the dense row: filled in by results_table

    for name in SPEEDUPS:
        row[name] = 1.0 if dense else _float(_get(speed, "ratios", "compressed", name))
    if dense_like and not dense:
        row["ideal_speedup"] = 1.0  # L / L; its speed is not timed (the dense architecture)
    for name in INFERENCE:
        row[name] = NAN if dense_like else _float(_get(speed, "models", "compressed", name))
    row["method_type"] = "dense" if dense_like else plan.get("method") or compression.get("method")
    # what the method's choice cost (plan or search rule) and what building the layers cost (compress rule)
    row["choice_seconds"] = _float(_get(plan, "cost", "seconds"))
    row["choice_block_forwards"] = _float(_get(plan, "cost", "block_forwards"))
    row["compression_seconds"] = _float(_get(compression, "timings", "seconds"))
    row["compression_peak_rss_mib"] = _float(compression.get("peak_rss_mib"))
    # what the recovery tuning cost (recover rule); a recovered row's compression columns are its source's
    row["recovery_steps"] = _get(recovery, "steps", "total")
    row["recovery_seconds"] = _float(_get(recovery, "timings", "seconds"))
    row["size_on_disk_mb"] = size_on_disk_mb(model_dir)
    return row


def _dense_inference(entries: list[dict]) -> dict[str, dict]:
    """Per model, the dense model's inference figures from the first speed JSON (by path) that has them.

    The dense model is measured beside every compressed one; any of those runs describes it.
    """
    found: dict[str, dict] = {}
    speeds = sorted((str(e["speed"]), e.get("model")) for e in entries if e.get("speed"))
    for path, model in speeds:
        if model not in found:
            record = _get(_read(path), "models", "dense")
            if record:
                found[model] = {name: _float(record.get(name)) for name in INFERENCE}
    return found


def _retention(row: pd.Series, dense: pd.Series, tasks: list[str]) -> float:
    """Mean accuracy over the tasks both rows have, as a fraction of the dense model's on the same tasks.

    With the same tasks on both sides (the normal case) this is mean_acc / dense mean_acc; restricting
    to shared tasks keeps one failed evaluation from comparing different averages.
    """
    shared = [t for t in tasks if math.isfinite(row[t]) and math.isfinite(dense[t])]
    if not shared:
        return NAN
    return float(np.mean([row[t] for t in shared]) / np.mean([dense[t] for t in shared]))


def _sort_key(row: dict) -> tuple:
    """Model, dense first, calibration, method, blocks removed; a recovered model right after its source."""
    blocks = row["blocks_removed"]
    source = row["recovered_from"] or row["method"]
    return (str(row["model"]), source != "dense", str(row["calibration"] or ""), str(source),
            math.inf if blocks is None else blocks, str(row["target"] or ""), row["recovered_from"] is not None,
            str(row["method"]))


def results_table(entries: list[dict]) -> pd.DataFrame:
    """One row per evaluated model, the columns described in workflow/report/results.rst.

    Rows are sorted by model, dense first, then calibration, method and blocks removed, each recovered
    model (`recovered_from` names its source method) right after its source.
    `param_ratio` is over the dense parameter count in model.json; `retention` and the dense row's
    inference figures need a dense entry / a speed run of the same model, and are NaN without one.
    """
    corpora = sorted({corpus for e in entries for corpus in (e.get("perplexity") or {})})
    tasks = _task_order(task for e in entries for task in (e.get("zero_shot") or {}))
    rows = sorted((_row(entry, corpora, tasks) for entry in entries), key=_sort_key)
    columns = (["model", "calibration", "method", "recovered_from", "method_type", "target", "blocks_removed",
                "num_layers", "parameters", "param_ratio"] + [f"ppl_{c}" for c in corpora]
               + [name for t in tasks for name in (t, f"{t}_stderr")]
               + ["mean_acc", "n_tasks", "retention", *SPEEDUPS, *INFERENCE, "choice_seconds",
                  "choice_block_forwards", "compression_seconds", "compression_peak_rss_mib", "recovery_steps",
                  "recovery_seconds", "size_on_disk_mb"])
    table = pd.DataFrame(rows, columns=columns)

    inference = _dense_inference(entries)
    for index, row in table.iterrows():
        if row["method"] == "dense":
            for name, value in inference.get(row["model"], {}).items():
                table.at[index, name] = value
    for model, rows_of_model in table.groupby("model", sort=False):
        dense = rows_of_model[rows_of_model["method"] == "dense"]
        if len(dense):
            for index, row in rows_of_model.iterrows():
                table.at[index, "retention"] = _retention(row, dense.iloc[0], tasks)
    for name in INT_COLUMNS:
        table[name] = pd.array([None if pd.isna(v) else int(v) for v in table[name]], dtype="Int64")
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------- CSV and Markdown


def _format(column: str, value: Any) -> str:
    """A cell for the Markdown table: rounded for reading, "–" for missing."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    value = float(value)
    if column.startswith("ppl_"):
        return f"{value:,.2f}"
    if column in ("param_ratio", "retention") or column.endswith("_speedup"):
        return f"{value:.3f}"
    if column in INT_COLUMNS or column == "kv_cache_bytes_per_token":
        return f"{value:,.0f}"
    if column in ("decode_ms_per_token", "size_on_disk_mb"):
        return f"{value:,.2f}"
    return f"{value:,.1f}"  # accuracies in percent, throughput, MiB, MB, seconds


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table with one header line and one line per row; numbers right-aligned."""
    columns = list(df.columns)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_format(c, row[c]) for c in columns) + " |")
    return "\n".join(lines)


def write_table(df: pd.DataFrame, csv_path: str | Path, md_path: str | Path, title: str | None = None,
                notes: Sequence[str] = ()) -> None:
    """The table as CSV (every column, full precision) and as Markdown (rounded), notes as bullets below."""
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    parts = [f"# {title}\n"] if title else []
    parts.append(markdown_table(df) + "\n")
    if notes:
        parts.append("\n".join(f"- {note}" for note in notes) + "\n")
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(parts))


# ----------------------------------------------------------------------------- recovered vs source

# columns a recovered row inherits from its source or that count rather than measure: no delta
NOT_COMPARED = ("blocks_removed", "n_tasks", "choice_seconds", "choice_block_forwards", "compression_seconds",
                "compression_peak_rss_mib", "recovery_steps", "recovery_seconds")
HIGHER_IS_BETTER = ("mean_acc", "retention", "prefill_speedup", "decode_speedup", "prefill_tokens_per_s")
LOWER_IS_BETTER = ("decode_ms_per_token", "peak_memory_mib")
RECOVERY_COLUMNS = ["model", "calibration", "target", "blocks_removed", "source", "recovery", "recovered", "metric",
                    "source_value", "recovered_value", "delta", "delta_pct", "delta_stderr", "better"]


def compared_columns(table: pd.DataFrame) -> list[str]:
    """The numeric columns recovery_table compares, in table order (standard errors go with their task)."""
    return [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and c not in NOT_COMPARED
            and not c.endswith("_stderr")]


def _direction(column: str, tasks: set[str]) -> int:
    """+1 where higher is better, -1 where lower is, 0 where neither (sizes, counts)."""
    if column.startswith("ppl_") or column in LOWER_IS_BETTER:
        return -1
    return 1 if column in tasks or column in HIGHER_IS_BETTER else 0


def _matches(series: pd.Series, value: Any) -> pd.Series:
    """series == value, with None / NaN equal to each other (the dense rows' calibration and target)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return series.isna()
    return series == value


def source_row(table: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The row a recovered row was tuned from: same model, calibration and target, method = recovered_from."""
    same = ((table["model"] == row["model"]) & (table["method"] == row["recovered_from"])
            & _matches(table["calibration"], row["calibration"]) & _matches(table["target"], row["target"])
            & table["recovered_from"].isna())
    found = table[same]
    return found.iloc[0] if len(found) else None


def recovery_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every recovered model against its source, one row per (recovered model, compared column).

    delta = recovered - source; delta_pct = 100 * delta / |source|; delta_stderr (task accuracies) =
    sqrt(se_source^2 + se_recovered^2), which ignores that both models answer the same items
    (conservative when their errors are positively correlated); better: yes / no / same where the
    column has a direction (perplexity and latency lower, accuracies and throughput higher), else empty.
    A recovered model whose source is not in the table gets NaN source values.
    """
    columns = compared_columns(table)
    tasks = {c for c in columns if f"{c}_stderr" in table.columns}
    rows = []
    for _, recovered in table[table["recovered_from"].notna()].iterrows():
        source = source_row(table, recovered)
        name = str(recovered["method"])
        recovery = name[len(str(recovered["recovered_from"])) + 1:]
        for column in columns:
            after = _float(recovered[column])
            before = NAN if source is None else _float(source[column])
            delta = after - before
            pct = 100 * delta / abs(before) if math.isfinite(delta) and before != 0 else NAN
            stderr = NAN
            if column in tasks and source is not None:
                stderr = math.hypot(_float(source[f"{column}_stderr"]), _float(recovered[f"{column}_stderr"]))
            direction = _direction(column, tasks)
            better = ("" if not direction or not math.isfinite(delta)
                      else "same" if delta == 0 else "yes" if delta * direction > 0 else "no")
            rows.append({"model": recovered["model"], "calibration": recovered["calibration"],
                         "target": recovered["target"], "blocks_removed": recovered["blocks_removed"],
                         "source": recovered["recovered_from"], "recovery": recovery, "recovered": name,
                         "metric": column, "source_value": before, "recovered_value": after, "delta": delta,
                         "delta_pct": pct, "delta_stderr": stderr, "better": better})
    out = pd.DataFrame(rows, columns=RECOVERY_COLUMNS)
    out["blocks_removed"] = pd.array([None if pd.isna(v) else int(v) for v in out["blocks_removed"]], dtype="Int64")
    return out


def _signed(column: str, value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return ("+" if value > 0 else "-" if value < 0 else "") + _format(column, abs(value))


def recovery_markdown(deltas: pd.DataFrame, title: str = "Recovery tuning: source vs recovered",
                      notes: Sequence[str] = ()) -> str:
    """One section per recovered model: every compared column with a value on either side, source,
    recovered, change (the CSV keeps the columns without values too)."""
    parts = [f"# {title}", ""]
    if not len(deltas):
        parts.append("No recovered models.")
    keys = ["model", "calibration", "target", "recovered"]
    for key, rows in deltas.groupby(keys, sort=False, dropna=False):
        model, calibration, target, recovered = key
        first = rows.iloc[0]
        where = " / ".join(str(p) for p in (target, calibration) if p is not None and not pd.isna(p))
        suffix = f" / {where}" if where else ""
        parts += [f"## {model}: {recovered}{suffix}", "",
                  f"Source: {first['source']}{suffix}; recovery setting {first['recovery']}.", "",
                  "| metric | source | recovered | delta | delta % | ± stderr | better |",
                  "|:---|---:|---:|---:|---:|---:|:---|"]
        for _, r in rows.iterrows():
            metric = r["metric"]
            if not (math.isfinite(r["source_value"]) or math.isfinite(r["recovered_value"])):
                continue
            pct = f"{r['delta_pct']:+.1f}%" if math.isfinite(r["delta_pct"]) else "–"
            stderr = _format(metric, r["delta_stderr"]) if math.isfinite(r["delta_stderr"]) else "–"
            parts.append(f"| {metric} | {_format(metric, r['source_value'])} | {_format(metric, r['recovered_value'])} "
                         f"| {_signed(metric, r['delta'])} | {pct} | {stderr} | {r['better'] or '–'} |")
        parts.append("")
    if notes:
        parts += [f"- {note}" for note in notes] + [""]
    return "\n".join(parts).rstrip("\n") + "\n"


def write_recovery(deltas: pd.DataFrame, csv_path: str | Path, md_path: str | Path,
                   notes: Sequence[str] = ()) -> None:
    """recovery_table as CSV (full precision) and as Markdown (one section per recovered model)."""
    with atomic_path(csv_path) as tmp:
        deltas.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        Path(tmp).write_text(recovery_markdown(deltas, notes=notes))


# ----------------------------------------------------------------------------- plots


def _numeric(series: pd.Series) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()


def _points(rows: pd.DataFrame, column: str, log_y: bool) -> dict[float, list[float]]:
    """The finite values of `column` (positive ones for a log axis), grouped by blocks removed."""
    values: dict[float, list[float]] = defaultdict(list)
    for x, y in zip(_numeric(rows["blocks_removed"]), _numeric(rows[column])):
        if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y):
            values[x].append(y)
    return values


def _line(label: str, values: dict[float, list[float]], colour: int, recovered: bool) -> dict:
    xs = sorted(values)
    mean = np.array([np.mean(values[x]) for x in xs])
    return {"label": label, "xs": xs, "mean": mean,
            "low": mean - np.array([min(values[x]) for x in xs]),
            "high": np.array([max(values[x]) for x in xs]) - mean,
            "spread": any(len(values[x]) > 1 for x in xs), "colour": colour, "recovered": recovered}


def vs_blocks_lines(df: pd.DataFrame, column: str, log_y: bool = False) -> list[dict]:
    """The lines plot_vs_blocks draws: label, xs, mean, low/high (error bar), spread, colour (an index
    into the colour cycle), recovered (drawn dashed).

    One line per (model, method), each starting at its dense point. A recovered method
    (`recovered_from` set) gets its source's colour and starts at the dense model recovered with the
    same setting (dense+{recovery}) when there is one; a dense+{recovery} that starts no line is a
    point of its own in the dense model's colour.
    """
    recovered_from = df["recovered_from"] if "recovered_from" in df.columns else pd.Series(None, index=df.index)
    models = list(dict.fromkeys(df["model"]))
    lines, colour = [], 0
    for model in models:
        of_model = df[df["model"] == model]
        source_of = recovered_from.loc[of_model.index]
        plain_rows = of_model[source_of.isna()]
        dense = plain_rows[plain_rows["method"] == "dense"]
        methods = [m for m in dict.fromkeys(plain_rows["method"]) if m != "dense"] or (["dense"] if len(dense) else [])
        colours: dict[str, int] = {}

        def label(method: str) -> str:
            return method if len(models) == 1 else f"{model} / {method}"

        for method in methods:
            colours[method], colour = colour, colour + 1
            own = _points(plain_rows[plain_rows["method"] == method], column, log_y)
            if not own:
                continue  # a method without values of its own would only repeat the dense point
            values = own if method == "dense" else _points(pd.concat([dense, plain_rows[plain_rows["method"] == method]]),
                                                           column, log_y)
            lines.append(_line(label(method), values, colours[method], False))

        recovered = of_model[source_of.notna()]
        pairs = list(dict.fromkeys(zip(source_of.loc[recovered.index], recovered["method"])))
        started = set()  # the dense+{recovery} rows that begin a recovered method's line
        for source, method in pairs:
            if source == "dense":
                continue
            recovery = method[len(source) + 1:]
            start = recovered[recovered["method"] == f"dense+{recovery}"]
            own = _points(recovered[recovered["method"] == method], column, log_y)
            if not own:
                continue
            if len(start):
                started.add(f"dense+{recovery}")
            values = _points(pd.concat([start, recovered[recovered["method"] == method]]), column, log_y)
            if source not in colours:
                colours[source], colour = colour, colour + 1
            lines.append(_line(label(method), values, colours[source], True))
        for source, method in pairs:
            if source == "dense" and method not in started:
                own = _points(recovered[recovered["method"] == method], column, log_y)
                if own:
                    if "dense" not in colours:
                        colours["dense"], colour = colour, colour + 1
                    lines.append(_line(label(method), own, colours["dense"], True))
    return lines


def plot_vs_blocks(df: pd.DataFrame, column: str, path: str | Path, ylabel: str, title: str,
                   log_y: bool = False) -> None:
    """`column` against blocks removed, one line per (model, method), each starting at its dense point.

    Several calibrations of one method give several values per x: the line goes through their mean
    and an error bar spans their min to max, the spread due to the calibration set. A recovered
    method is dashed with open markers, in its source method's colour (`vs_blocks_lines`).
    """
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    lines = vs_blocks_lines(df, column, log_y)
    for line in lines:
        # the colour cycle has 10 colours: the 11th source method and later get another marker
        marker = ("o", "s", "^")[(line["colour"] // 10) % 3]
        axes.errorbar(line["xs"], line["mean"], yerr=np.vstack([line["low"], line["high"]]) if line["spread"] else None,
                      marker=marker, capsize=3, label=line["label"], color=f"C{line['colour'] % 10}",
                      linestyle="--" if line["recovered"] else "-",
                      markerfacecolor="none" if line["recovered"] else None)
    if lines:
        axes.legend(fontsize="small")
        if log_y:
            axes.set_yscale("log")
    else:
        axes.text(0.5, 0.5, f"no values of {column}", ha="center", va="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("blocks removed")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_plan(cosine_csv: str | Path, plan_jsons: dict[str, str | Path] | str | Path, path: str | Path,
              title: str) -> None:
    """The block-input cosine similarity with every method's choice overlaid (plots.plan_overlay)."""
    from .plots import plan_overlay
    from .similarity import load_matrix

    if not isinstance(plan_jsons, dict):
        plan_jsons = {"plan": plan_jsons}
    matrix, labels = load_matrix(cosine_csv)
    plan_overlay(matrix, labels, {name: read_json(p) for name, p in plan_jsons.items()}, title, path)


# ----------------------------------------------------------------------------- validated lambdas

PICK_FITS = (("mlp", "MLP"), ("attention", "o_proj"), ("map", "map"))  # lambda_validation keys, plot labels


def lambda_picks(entries: list[dict]) -> pd.DataFrame:
    """One row per validated fit (lambda_factor auto) of every compressed model: where, which fit, the pick.

    Read from compression.json's group_stats: `lambda_validation.{mlp,attention,map}.pick`.
    """
    rows = []
    for entry in entries:
        path = entry.get("compression_json")
        if not path or not Path(path).is_file():
            continue
        for layer, stats in enumerate(_read(path).get("group_stats", [])):
            validation = stats.get("lambda_validation") or {}
            for key, label in PICK_FITS:
                if key in validation:
                    curve = validation[key]
                    rows.append({"model": entry["model"], "calibration": entry.get("calibration"),
                                 "target": entry.get("target"), "method": entry["method"], "layer": layer,
                                 "first_block": stats["blocks"][0], "blocks": "-".join(map(str, stats["blocks"])),
                                 "fit": label, "pick": curve["pick"],
                                 "held_out_rel_error": curve["held_out_rel_error"][curve["pick_index"]]})
    return pd.DataFrame(rows, columns=["model", "calibration", "target", "method", "layer", "first_block", "blocks",
                                       "fit", "pick", "held_out_rel_error"])


def plot_lambda_picks(picks: pd.DataFrame, path: str | Path) -> None:
    """The validated factor of every fit against the depth of its group's first block (log axis; 0 at the bottom)."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    if len(picks):
        positive = picks["pick"][picks["pick"] > 0]
        floor = (positive.min() if len(positive) else 1.0) / 10  # where a pick of 0 (least squares) is drawn
        keys = ["model", "calibration", "target", "method", "fit"]
        for number, (key, rows) in enumerate(picks.groupby(keys, sort=False, dropna=False)):
            rows = rows.sort_values("first_block")
            ys = np.where(rows["pick"] > 0, rows["pick"], floor)
            label = " / ".join(str(k) for k, n in zip(key, keys) if picks[n].nunique(dropna=False) > 1) or key[-2]
            axes.plot(rows["first_block"], ys, marker="o", label=label,
                      linestyle=("-", "--", ":")[(number // 10) % 3])
        axes.set_yscale("log")
        if (picks["pick"] == 0).any():
            axes.axhline(floor, color="grey", linewidth=0.5)
            axes.text(0.01, floor, " 0 (least squares)", transform=axes.get_yaxis_transform(), va="bottom",
                      fontsize="small", color="grey")
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no fit with lambda_factor auto", ha="center", va="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("first source block of the group")
    axes.set_ylabel("picked lambda_factor (held-out error)")
    axes.set_title("Validated regularization per group")
    axes.grid(alpha=0.3)
    _save(figure, path)


# ----------------------------------------------------------------------------- generations


def _quote(text: str) -> str:
    lines = text.strip("\n").splitlines() or [""]
    return "\n".join(f"> {line}".rstrip() for line in lines) if text.strip() else "> *(empty)*"


def generations_markdown(entries_with_generations: list[tuple[str, dict]]) -> str:
    """For each prompt (in order of first appearance), every labelled variant's completion as a blockquote."""
    prompts: dict[str, dict[str, dict]] = {}
    for label, record in entries_with_generations:
        for output in (record or {}).get("outputs", []):
            prompts.setdefault(output["prompt"], {})[label] = output
    labels = list(dict.fromkeys(label for label, _ in entries_with_generations))
    parts = ["# Sample generations", "",
             "Greedy completions of the same prompts by every model; the prompt is not repeated in them."]
    for number, (prompt, outputs) in enumerate(prompts.items(), start=1):
        parts += ["", f"## Prompt {number}", "", _quote(prompt)]
        for label in labels:
            output = outputs.get(label)
            if output is None:
                parts += ["", f"**{label}**: no output"]
                continue
            tokens = output.get("n_new_tokens")
            parts += ["", f"**{label}**" + (f" ({tokens} new tokens)" if tokens is not None else ""), "",
                      _quote(str(output.get("completion", "")))]
    return "\n".join(parts) + "\n"
