"""The methods comparison from what run.py collected in runs/: the report's table, a per-method summary, winners.

    .venv/bin/python benchmarks/methods_comparison/summarize.py [--config config.yaml]

Writes next to this script:
  results.csv, results.md  flattengpt.report.results_table over every evaluated model found in runs/
                           (the workflow's report format; no checkpoints here, so parameters come
                           from the plans and size_on_disk_mb is empty);
  recovery.csv, recovery.md
                           flattengpt.report.recovery_table: every recovered model (run.py phase 4)
                           against its unrecovered source, column by column;
  summary.md               one row per (method, blocks removed): perplexities as the mean over the
                           calibration seeds ± half their spread, zero-shot accuracies of seed 0
                           ± lm-eval's standard error, the mean accuracy, what the choice and the
                           compression cost; then, per column, the winner and how far FlattenGPT
                           (the `flattengpt` entry, its best setting) is behind it (recovered
                           models are not candidates: they had extra training); then the recovered
                           models before and after, and the gap between the methods before and after;
  figures/                 the plan overlays (cosine heatmap with every method's plan) per
                           calibration and target, perplexity and accuracy against blocks removed,
                           the sample generations;
and fills the results section of README.md (between the `results:begin` / `results:end` marks).
Missing values show as "–".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (CONFIG, PHASES, RUNS, all_units, is_done, load_config, method_order,  # noqa: E402
                 recovered_methods)

from flattengpt.report import (generations_markdown, plot_plan, plot_vs_blocks, recovery_table,  # noqa: E402
                               results_table, variant_label, write_recovery, write_table)

REFERENCE = "flattengpt"   # FlattenGPT's best setting: the method whose gaps are reported
DASH = "–"


# ----------------------------------------------------------------------------- entries (as report_entries)


def entries(config: dict) -> list[dict]:
    """report_entries of workflow/rules/common.smk, pointing at runs/ and kept only where something was collected."""
    (model,) = list(config["models"])
    evaluation = config.get("evaluation", {})
    corpora = list(evaluation.get("perplexity", {}).get("corpora", {}))
    tasks = list(evaluation.get("zero_shot", {}).get("tasks", []))
    variants = ["dense"] + [f"{c}/{t}/{m}" for c in config["calibration"] for t in config["targets"]
                            for m in method_order(config)]
    first = next(iter(config["calibration"]))
    variants += [f"{first}/{t}/{m}" for t, _, m in recovered_methods(config)]  # run.py phase 4
    found = []
    for variant in variants:
        base = RUNS / model / variant
        dense = variant == "dense"
        calib, target, method = (None, None, "dense") if dense else variant.split("/")
        source, _, recovery = method.partition("+")
        entry = {
            "model": model, "calibration": calib, "target": target, "method": method,
            "recovered_from": source if recovery else None, "recovery": recovery or None,
            "recovery_json": str(base / "model" / "recovery.json") if recovery else None,
            "model_json": str(RUNS / model / "model.json"),
            "model_dir": None if dense else str(base / "model"),  # compression.json only: params from the plan
            "compression_json": None if dense else str(base / "model" / "compression.json"),
            "plan_json": None if dense else str(RUNS / model / calib / target / source / "plan.json"),
            "perplexity": {c: str(base / "eval" / "perplexity" / f"{c}.json") for c in corpora},
            "zero_shot": {t: str(base / "eval" / "zero_shot" / f"{t}.json") for t in tasks},
            "speed": None,
            "generations": str(base / "eval" / "generations.json"),
        }
        # a recovered model shares its source's plan: it counts as found once something of its own is there
        files = [entry["recovery_json"] if recovery else entry["plan_json"], entry["compression_json"],
                 entry["generations"], *entry["perplexity"].values(), *entry["zero_shot"].values()]
        if any(f and Path(f).is_file() for f in files):
            found.append(entry)
    return found


def _read(path) -> dict:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}


def table(config: dict, found: list[dict]) -> pd.DataFrame:
    df = results_table(found)
    # choice cost columns, for a flattengpt.report that predates them
    by_variant = {(e["calibration"], e["target"], e["method"]): e for e in found}
    for column, key in (("choice_seconds", "seconds"), ("choice_block_forwards", "block_forwards")):
        if column not in df:
            df[column] = [float((_read(by_variant[(r.calibration, r.target, r.method)]["plan_json"]).get("cost")
                                 or {}).get(key, math.nan)) if r.method != "dense" else math.nan
                          for r in df.itertuples()]
    return df


# ----------------------------------------------------------------------------- summary


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float, digits: int) -> str:
    return DASH if not math.isfinite(value) else f"{value:,.{digits}f}"


def summary_rows(config: dict, df: pd.DataFrame) -> list[dict]:
    """One dict per (method, target): mean/half-spread over seeds, seed-0 accuracies and their stderr."""
    corpora = list(config["evaluation"]["perplexity"]["corpora"])
    tasks = list(config["evaluation"]["zero_shot"]["tasks"])
    calibs = list(config["calibration"])
    seed0 = calibs[0]
    rows = []
    recovered = recovered_methods(config)
    keys = [("dense", None)]
    for target in config["targets"]:
        for method in method_order(config):  # each recovered model right after its source
            keys += [(method, target)] + [(r, t) for t, source, r in recovered if (t, source) == (target, method)]
    for method, target in keys:
        rows_of = df[(df["method"] == method) & ((df["target"] == target) if target else df["target"].isna())]
        k = 0 if method == "dense" else config["targets"][target].get("remove_blocks")
        row = {"method": method, "target": target, "k": k}
        ppl_seeds = 0
        for corpus in corpora:
            values = [_num(v) for v in rows_of[f"ppl_{corpus}"]]
            values = [v for v in values if math.isfinite(v)]
            ppl_seeds = max(ppl_seeds, len(values))
            row[f"ppl_{corpus}"] = float(np.mean(values)) if values else math.nan
            row[f"ppl_{corpus}_half"] = (max(values) - min(values)) / 2 if len(values) > 1 else math.nan
        row["seeds"] = ppl_seeds
        first = rows_of[rows_of["calibration"] == seed0] if method != "dense" else rows_of
        first = first.iloc[0] if len(first) else None
        row["seed0"] = {f"ppl_{c}": _num(first[f"ppl_{c}"]) if first is not None else math.nan for c in corpora}
        row["recovery_steps"] = _num(first["recovery_steps"]) if first is not None else math.nan
        row["recovery_seconds"] = _num(first["recovery_seconds"]) if first is not None else math.nan
        for task in tasks:
            row[task] = _num(first[task]) if first is not None else math.nan
            row[f"{task}_se"] = _num(first[f"{task}_stderr"]) if first is not None else math.nan
        n_tasks = sum(math.isfinite(row[t]) for t in tasks)
        row["mean_acc"] = float(np.mean([row[t] for t in tasks])) if tasks and n_tasks == len(tasks) else math.nan
        row["mean_acc_se"] = (math.sqrt(sum(row[f"{t}_se"] ** 2 for t in tasks)) / len(tasks)
                              if math.isfinite(row["mean_acc"]) else math.nan)
        row["seed0"]["mean_acc"] = row["mean_acc"]
        for column in ("choice_block_forwards", "choice_seconds", "compression_seconds"):
            values = [_num(v) for v in rows_of[column]] if method != "dense" else []
            values = [v for v in values if math.isfinite(v)]
            row[column] = float(np.mean(values)) if values else math.nan
            row[f"{column}_half"] = (max(values) - min(values)) / 2 if len(values) > 1 else math.nan
        rows.append(row)
    return rows


def _cell(row: dict, column: str, spread: str | None, digits: int) -> str:
    text = _fmt(row[column], digits)
    half = row.get(spread, math.nan) if spread else math.nan
    return text if text == DASH or not math.isfinite(half) else f"{text} ± {half:,.{digits}f}"


# column, spread key, digits, better ("low" or "high"), header
def columns(config: dict) -> list[tuple[str, str | None, int, str, str]]:
    out = [(f"ppl_{c}", f"ppl_{c}_half", 2, "low", f"ppl {c}") for c in config["evaluation"]["perplexity"]["corpora"]]
    out += [(t, f"{t}_se", 1, "high", t) for t in config["evaluation"]["zero_shot"]["tasks"]]
    out += [("mean_acc", "mean_acc_se", 1, "high", "mean acc"),
            ("choice_block_forwards", None, 0, "low", "choice block fwd"),
            ("choice_seconds", "choice_seconds_half", 1, "low", "choice s"),
            ("compression_seconds", "compression_seconds_half", 1, "low", "compression s")]
    return out


def summary_markdown(config: dict, rows: list[dict]) -> str:
    cols = columns(config)
    lines = ["| method | k | seeds | " + " | ".join(c[4] for c in cols) + " |",
             "|:---|---:|---:|" + "---:|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['method']} | {row['k']} | {row['seeds'] or DASH} | "
                     + " | ".join(_cell(row, c, s, d) for c, s, d, _, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def winners_markdown(config: dict, rows: list[dict]) -> str:
    """Per k and column: the best method, and FlattenGPT's gap to it with the noise it should be read against.

    Noise: for seed-averaged columns the larger of the two half spreads, for accuracies the
    combined lm-eval standard error sqrt(se_w^2 + se_f^2) (the mean accuracy: of the task means).
    """
    lines = ["| k | column | methods with data | best | best value | flattengpt | flattengpt behind by | noise |",
             "|---:|:---|---:|:---|---:|---:|---:|---:|"]
    for target, spec in config["targets"].items():
        # recovered models had extra training: not candidates here (see the recovery section)
        of_k = [r for r in rows if r["target"] == target and "+" not in r["method"]]
        for column, spread, digits, better, header in columns(config):
            have = [r for r in of_k if math.isfinite(r[column])]
            if not have:
                lines.append(f"| {spec.get('remove_blocks')} | {header} | 0 of {len(of_k)} | {DASH} | {DASH} | {DASH} | "
                             f"{DASH} | {DASH} |")
                continue
            sign = 1 if better == "low" else -1
            best_value = min(sign * r[column] for r in have) * sign
            best = [r["method"] for r in have if r[column] == best_value]
            ref = next((r for r in of_k if r["method"] == REFERENCE), None)
            ref_value = ref[column] if ref else math.nan
            if not math.isfinite(ref_value):
                gap = DASH
            elif REFERENCE in best:
                gap = "wins" if len(best) == 1 else "tie"
            else:
                diff = sign * (ref_value - best_value)
                rel = f" ({100 * diff / abs(best_value):.0f}%)" if best_value else ""
                gap = f"{diff:,.{digits}f}{rel}"
            noise = math.nan
            if ref and spread and math.isfinite(ref_value):
                winner = next(r for r in have if r["method"] == best[0])
                a, b = ref.get(spread, math.nan), winner.get(spread, math.nan)
                if better == "high":  # standard errors: combined
                    noise = math.sqrt(a ** 2 + b ** 2) if math.isfinite(a) and math.isfinite(b) else math.nan
                else:  # seed half spreads: the larger
                    noise = max(x for x in (a, b) if math.isfinite(x)) if any(map(math.isfinite, (a, b))) else math.nan
            lines.append(f"| {spec.get('remove_blocks')} | {header} | {len(have)} of {len(of_k)} | {', '.join(best)} | "
                         f"{_fmt(best_value, digits)} | "
                         f"{_fmt(ref_value, digits)} | {gap} | {_fmt(noise, digits)} |")
    return "\n".join(lines) + "\n"


def _gap(x: float, y: float, better: str) -> str:
    """x against y: relative for perplexity (lower is better), in points for accuracy."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return DASH
    return f"{100 * (x - y) / y:+.1f}%" if better == "low" else f"{x - y:+.1f}"


def recovery_markdown(config: dict, rows: list[dict]) -> str:
    """Each recovered model before and after, and how the gap between two methods recovered alike changes.

    before = the source method's seed-0 values (the recovered model is tuned from the seed-0
    checkpoint), after = the recovered row.
    """
    recovered = recovered_methods(config)
    if not recovered:
        return "No recovery setting.\n"
    by_key = {(r["method"], r["target"]): r for r in rows}
    corpora = list(config["evaluation"]["perplexity"]["corpora"])
    cols = [(f"ppl_{c}", 2, "low", f"ppl {c}") for c in corpora] + [("mean_acc", 1, "high", "mean acc")]

    def before(source: str, target: str, column: str) -> float:
        return by_key.get((source, target), {}).get("seed0", {}).get(column, math.nan)

    def after(method: str, target: str, column: str) -> float:
        return by_key.get((method, target), {}).get(column, math.nan)

    lines = ["| method | k | recovery | " + " | ".join(f"{h} before | {h} after" for _, _, _, h in cols)
             + " | steps | recovery s |",
             "|:---|---:|:---|" + "---:|---:|" * len(cols) + "---:|---:|"]
    for target, source, method in recovered:
        if (source, target) not in by_key or (method, target) not in by_key:
            continue
        cells = [_fmt(value, digits) for column, digits, _, _ in cols
                 for value in (before(source, target, column), after(method, target, column))]
        lines.append(f"| {source} | {config['targets'][target].get('remove_blocks')} | {method.partition('+')[2]} | "
                     + " | ".join(cells) + f" | {_fmt(after(method, target, 'recovery_steps'), 0)} | "
                     f"{_fmt(after(method, target, 'recovery_seconds'), 0)} |")
    gaps = ["", "Gap between the methods recovered with the same setting (first method minus second; "
            "perplexity: relative, accuracy: points):", ""]
    pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for target, source, method in recovered:
        pairs.setdefault((target, method.partition("+")[2]), []).append((source, method))
    for (target, recovery), members in pairs.items():
        for (a, ra), (b, rb) in zip(members, members[1:]):
            parts = [f"{header} {_gap(before(a, target, c), before(b, target, c), better)} before, "
                     f"{_gap(after(ra, target, c), after(rb, target, c), better)} after"
                     for c, _, better, header in cols]
            gaps.append(f"- k = {config['targets'][target].get('remove_blocks')}, {recovery}: {a} vs {b}: "
                        + "; ".join(parts) + ".")
    return "\n".join(lines + gaps) + "\n"


def status_markdown(config: dict) -> str:
    units = all_units(config)
    lines = ["| phase | units collected | pending |", "|:---|---:|:---|"]
    for phase, title in PHASES.items():
        of = [u for u in units if u.phase == phase]
        pending = [u.name for u in of if not is_done(u)]
        shown = ", ".join(pending[:6]) + (f", ... ({len(pending)} in all)" if len(pending) > 6 else "")
        lines.append(f"| {phase} {title} | {len(of) - len(pending)} of {len(of)} | {shown or 'none'} |")
    return "\n".join(lines) + "\n"


def unit_costs_markdown() -> str:
    """Wall time of every collected unit run (runs/units.jsonl), by kind and method."""
    path = RUNS / "units.jsonl"
    if not path.is_file():
        return "No unit has run yet.\n"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| unit | wall | jobs run | load avg (1 min) at end | finished (UTC) |", "|:---|---:|:---|---:|:---|"]
    for r in records:
        jobs = ", ".join(f"{k} {v}" for k, v in sorted(r.get("jobs", {}).items())) or "none"
        status = "" if r.get("complete") else " (incomplete)"
        lines.append(f"| {r['unit']}{status} | {r['wall_seconds'] / 60:.1f} min | {jobs} | "
                     f"{r.get('load_average_1min_at_end', DASH)} | {r.get('finished', DASH)} |")
    return "\n".join(lines) + "\n"


FULL = HERE / "full_tasks"  # the five tasks without an item limit for two models (full_tasks/config.yaml)


def full_tasks_markdown(config: dict, rows: list[dict]) -> str:
    """Every item of each task for the models of full_tasks/config.yaml, beside their 500-item values."""
    full = load_config(FULL / "config.yaml")
    (model,) = full["models"]
    tasks = list(full["evaluation"]["zero_shot"]["tasks"])
    by_key = {(r["method"], r["target"]): r for r in rows}
    lines = ["| method | k | " + " | ".join(tasks) + " | mean acc | items | 500-item mean acc |",
             "|:---|---:|" + "---:|" * (len(tasks) + 3)]
    found = False
    for target, spec in full["targets"].items():
        for method in full["methods"]:
            base = FULL / "runs" / model / next(iter(full["calibration"])) / target / method / "eval" / "zero_shot"
            records = {t: _read(base / f"{t}.json") for t in tasks}
            if not any(records.values()):
                continue
            found = True
            cells = [f"{100 * r['value']:.1f} ± {100 * r['stderr']:.1f}" if r else DASH for r in records.values()]
            if all(records.values()):
                mean = float(np.mean([100 * r["value"] for r in records.values()]))
                se = math.sqrt(sum((100 * r["stderr"]) ** 2 for r in records.values())) / len(tasks)
                mean_cell = f"{mean:.1f} ± {se:.1f}"
            else:
                mean_cell = DASH
            items = sum((r.get("n_samples") or {}).get("effective", 0) for r in records.values() if r)
            limited = by_key.get((method, target), {}).get("mean_acc", math.nan)
            lines.append(f"| {method} | {spec.get('remove_blocks')} | " + " | ".join(cells) + f" | {mean_cell} | "
                         f"{items:,} | {_fmt(limited, 1)} |")
    return "\n".join(lines) + "\n" if found else "Not run yet.\n"


# ----------------------------------------------------------------------------- figures


def figures(config: dict, df: pd.DataFrame, found: list[dict]) -> list[str]:
    out_dir = HERE / "figures"
    out_dir.mkdir(exist_ok=True)
    written = []
    (model,) = list(config["models"])
    for calib in config["calibration"]:
        cosine = RUNS / model / calib / "similarity" / "cosine.csv"
        for target in config["targets"]:
            plans = {m: RUNS / model / calib / target / m / "plan.json" for m in method_order(config)}
            plans = {m: p for m, p in plans.items() if p.is_file()}
            if cosine.is_file() and plans:
                path = out_dir / f"plans.{calib}.{target}.png"
                plot_plan(cosine, plans, path, f"{model}, {calib}, {target}: every method's plan")
                written.append(path.name)
    for corpus in config["evaluation"]["perplexity"]["corpora"]:
        column = f"ppl_{corpus}"
        if pd.to_numeric(df[column], errors="coerce").notna().any():
            path = out_dir / f"perplexity_{corpus}.png"
            plot_vs_blocks(df, column, path, f"perplexity ({corpus})", f"{corpus}: perplexity vs blocks removed",
                           log_y=True)
            written.append(path.name)
    if pd.to_numeric(df["mean_acc"], errors="coerce").notna().any():
        path = out_dir / "accuracy.png"
        plot_vs_blocks(df, "mean_acc", path, "mean zero-shot accuracy (%)", "mean accuracy vs blocks removed")
        written.append(path.name)
    generations = [(variant_label(e), _read(e["generations"])) for e in found if Path(e["generations"]).is_file()]
    if generations:
        (out_dir / "generations.md").write_text(generations_markdown(generations))
        written.append("generations.md")
    return written


# ----------------------------------------------------------------------------- README


BEGIN, END = "<!-- results:begin (written by summarize.py) -->", "<!-- results:end -->"


def fill_readme(text: str) -> None:
    readme = HERE / "README.md"
    if not readme.is_file():
        return
    current = readme.read_text()
    if BEGIN not in current or END not in current:
        print(f"README.md has no {BEGIN} ... {END} section; not filled", file=sys.stderr)
        return
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n\n" + text.strip() + "\n\n" + END + tail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    found = entries(config)
    if not found:
        raise SystemExit(f"nothing collected in {RUNS} yet: run run.py first")
    df = table(config, found)
    notes = ["Written by benchmarks/methods_comparison/summarize.py from runs/ (flattengpt.report.results_table).",
             "parameters and param_ratio come from each plan (params_after): the checkpoints are not kept."]
    write_table(df, HERE / "results.csv", HERE / "results.md", title="Methods comparison: every evaluated model",
                notes=notes)
    rows = summary_rows(config, df)
    if recovered_methods(config):
        write_recovery(recovery_table(df), HERE / "recovery.csv", HERE / "recovery.md",
                       notes=["Written by benchmarks/methods_comparison/summarize.py from runs/ "
                              "(flattengpt.report.recovery_table); speed is off in this benchmark."])
    corpora = list(config["evaluation"]["perplexity"]["corpora"])
    model_json = _read(found[0]["model_json"])
    layers = model_json.get("num_hidden_layers") or model_json.get("num_layers", "?")
    text = "\n".join([
        "### Units collected", "", status_markdown(config),
        "### Summary", "",
        f"k = blocks removed of {layers}. "
        "Perplexity: mean over the calibration seeds collected (`seeds`) ± half the spread between them; "
        + "; ".join(f"{c}: first {config['evaluation']['perplexity']['corpora'][c].get('max_windows') or 'all'} windows"
                    for c in corpora)
        + f" of {config['evaluation']['perplexity'].get('seq_len', 2048)} tokens. Accuracies (%): seed-0 models, lm-eval `acc_norm` (WinoGrande `acc`) "
        f"± its standard error, on the first {config['evaluation']['zero_shot'].get('limit')} items of each task; "
        "mean acc only where all five tasks are there (± the standard error of the mean of the five). "
        "Cost: choice (plan or search) block forwards and seconds from plan.json, compression seconds from "
        "compression.json, mean over seeds ± half spread.", "",
        summary_markdown(config, rows),
        "### Who wins", "",
        f"Per column, the best method (lowest perplexity or cost, highest accuracy) and how far `{REFERENCE}` "
        "(FlattenGPT's best setting: original target, lambda factor 0.1) is behind it, absolute (relative). "
        "`noise`: the larger seed half spread of the two (perplexity, cost) or the combined standard "
        "error (accuracy); a gap below it is not a measured difference.", "",
        winners_markdown(config, rows),
        "### Recovery tuning (phase 4)", "",
        "Each recovered model (the `recovery:` setting of config.yaml, LoRA on "
        "`alpaca_data_1k.json`, tuned from the seed-0 checkpoint) before and after: seed-0 values on both "
        "sides; every column in [recovery.md](recovery.md).", "",
        recovery_markdown(config, rows),
        "### Full task sets", "",
        "Every item of each task (`full_tasks/config.yaml`: same calibration, options and task settings, "
        "no item limit) for FlattenGPT's best setting and the best baseline at k = 6, seed 0, beside the "
        "500-item mean above.", "",
        full_tasks_markdown(config, rows),
        "### Cost of each unit run", "",
        "Wall time of each run.py unit on this machine (2 cores, shared with other work: see the load "
        "average); a unit's jobs include whatever of the model, calibration, activations, plan/search "
        "and compression it had to (re)build.", "",
        unit_costs_markdown(),
    ])
    (HERE / "summary.md").write_text("# Methods comparison: summary\n\n" + text)
    written = figures(config, df, found)
    if written:
        text += "\nFigures in [figures/](figures/): " + ", ".join(f"[{w}](figures/{w})" for w in written) + ".\n"
    fill_readme(text)
    print(text)


if __name__ == "__main__":
    main()
