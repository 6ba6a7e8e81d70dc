"""The levers study from what run.py collected in runs/: every setting, the choice, the chosen one against the baselines.

    .venv/bin/python benchmarks/flattengpt_levers/summarize.py

A setting is a method of config.yaml on a calibration family (a calibration and its seed replicas:
`wikitext2`, `wikitext2x4`, `mix`). For each setting and target it reports the perplexity of every
corpus (mean over the seeds collected ± half their spread), the selection score, the five tasks on
seed 0 with lm-eval's standard errors, and the compression time.

Selection score: the geometric mean of the perplexities on the selection corpora (held-out Alpaca
records and Python standard-library modules), averaged over seeds. The chosen setting is the one of
lowest mean log selection score over both targets, among the settings collected at every target with
every seed: a default is one setting for every depth. The reported corpora (WikiText-2 test, tiny
Shakespeare) and the tasks never enter the choice.

The baselines (ShortGPT, SLEB, ReplaceMe) come from benchmarks/methods_comparison/runs: same model,
calibration windows, corpus windows and task items. Writes summary.md here and fills the results
section of README.md (between the `results:begin` / `results:end` marks).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
COMPARISON = HERE.parent / "methods_comparison"
sys.path.insert(0, str(COMPARISON))

import run as driver  # noqa: E402

from flattengpt.config import runs  # noqa: E402

CONFIG = HERE / "config.yaml"
driver.use_config(CONFIG)
RUNS = driver.RUNS

SELECTION = ("alpaca-selection", "python-selection")
REPORTED = ("wikitext2-test", "tinyshakespeare")
BASELINES = ("shortgpt", "sleb", "replaceme")
LEVERS = {  # method name -> the lever it moves away from the base (fg-orig-auto on wikitext2)
    "fg-orig-auto": "base: original target, lambda validated",
    "flattengpt": "lambda fixed at 0.1",
    "fg-flat-auto": "flattened target",
    "fg-orig-auto-attn": "o_proj refit",
    "fg-orig-auto-trial": "plan: trial-error pairs",
    "fg-orig-auto-span": "plan: one span of k+1 blocks",
    "fg-orig-auto-span-attn": "span plan and o_proj refit",
    "flattengpt-paper": "the paper: flattened target, factor 10",
}
DASH = "–"


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def families(config: dict) -> dict[str, list[str]]:
    """family name -> its calibrations (the first, then its seed replicas); the name drops the -seedN suffix."""
    out: dict[str, list[str]] = {}
    for name, primary in driver.seed_primaries(config).items():
        out.setdefault(primary.rsplit("-seed", 1)[0], []).append(name)
    return out


def model_values(runs: Path, model: str, variant: str, corpora, tasks) -> dict:
    """What was collected for one evaluated model: perplexities, accuracies with stderr, costs."""
    base = runs / model / variant
    values = {"ppl": {}, "acc": {}}
    for corpus in corpora:
        record = read(base / "eval" / "perplexity" / f"{corpus}.json")
        if "perplexity" in record:
            values["ppl"][corpus] = float(record["perplexity"])
    for task in tasks:
        record = read(base / "eval" / "zero_shot" / f"{task}.json")
        if "value" in record:
            values["acc"][task] = (100 * float(record["value"]), 100 * float(record["stderr"]))
    compression = read(base / "model" / "compression.json")
    values["compression_seconds"] = (compression.get("timings") or {}).get("seconds")
    values["peak_rss_mib"] = compression.get("peak_rss_mib")
    calib, _, rest = variant.partition("/")
    target, _, method = rest.partition("/")
    values["choice_seconds"] = (read(runs / model / calib / target / method / "plan.json").get("cost") or {}).get("seconds")
    return values


def mean_half(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), (max(values) - min(values)) / 2 if len(values) > 1 else math.nan


def row_of(runs: Path, model: str, calibs: list[str], target: str, method: str, corpora, tasks) -> dict:
    """One setting at one target: seed means of the perplexities and costs, seed-0 accuracies."""
    per_seed = [model_values(runs, model, f"{c}/{target}/{method}", corpora, tasks) for c in calibs]
    row = {"seeds": sum(bool(v["ppl"]) for v in per_seed)}
    for corpus in corpora:
        row[corpus] = mean_half([v["ppl"].get(corpus) for v in per_seed])
    scores = [math.exp(np.mean([math.log(v["ppl"][c]) for c in SELECTION]))
              for v in per_seed if all(c in v["ppl"] for c in SELECTION)]
    row["selection"] = mean_half(scores)
    row["selection_seeds"] = len(scores)
    accs = per_seed[0]["acc"]
    row["acc"] = accs
    if len(accs) == len(tasks):
        row["mean_acc"] = (float(np.mean([a for a, _ in accs.values()])),
                           math.sqrt(sum(se ** 2 for _, se in accs.values())) / len(tasks))
    else:
        row["mean_acc"] = (math.nan, math.nan)
    row["compression_seconds"] = mean_half([v["compression_seconds"] for v in per_seed])
    row["peak_rss_mib"] = mean_half([v["peak_rss_mib"] for v in per_seed])
    row["choice_seconds"] = mean_half([v["choice_seconds"] for v in per_seed])
    return row


def fmt(pair: tuple[float, float], digits: int) -> str:
    value, half = pair
    if not math.isfinite(value):
        return DASH
    return f"{value:,.{digits}f}" + (f" ± {half:,.{digits}f}" if math.isfinite(half) else "")


def settings_rows(config: dict) -> tuple[list[dict], dict]:
    """(one row per setting and target, the dense model's values)."""
    (model,) = config["models"]
    corpora = list(config["evaluation"]["perplexity"]["corpora"])
    tasks = list(config["evaluation"]["zero_shot"]["tasks"])
    fams = families(config)
    calib_family = {c: f for f, cs in fams.items() for c in cs}
    cells = {}
    for run in runs(config):
        for method in run["methods"]:
            cells.setdefault((method, calib_family[run["calibration"]], run["target"]), None)
    rows = []
    for (method, family, target) in cells:
        row = row_of(RUNS, model, fams[family], target, method, corpora, tasks)
        lever = LEVERS.get(method, method) if family == "wikitext2" else f"calibration: {family}"
        rows.append({"setting": method if family == "wikitext2" else f"{method} @ {family}", "method": method,
                     "family": family, "target": target, "k": config["targets"][target]["remove_blocks"],
                     "lever": lever, **row})
    dense = model_values(RUNS, model, "dense", corpora, tasks)
    return rows, dense


def baseline_rows(config: dict) -> list[dict]:
    comparison = yaml.safe_load((COMPARISON / "config.yaml").read_text())
    (model,) = comparison["models"]
    corpora = [c for c in REPORTED if c in comparison["evaluation"]["perplexity"]["corpora"]]
    tasks = list(comparison["evaluation"]["zero_shot"]["tasks"])
    calibs = [c for c in comparison["calibration"] if c.startswith("wikitext2-seed")]
    rows = []
    for target in config["targets"]:
        for method in BASELINES:
            row = row_of(COMPARISON / "runs", model, calibs, target, method, corpora, tasks)
            rows.append({"setting": method, "method": method, "family": "wikitext2", "target": target,
                         "k": config["targets"][target]["remove_blocks"], "lever": "baseline (methods comparison)",
                         **row})
    return rows


def choose(rows: list[dict], config: dict) -> tuple[str | None, list[tuple[str, float]]]:
    """The setting of lowest mean log selection score over every target, among those complete at every target."""
    targets = list(config["targets"])
    seeds = {f: len(cs) for f, cs in families(config).items()}
    by_setting: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], {})[row["target"]] = row
    ranked = []
    for setting, of in by_setting.items():
        if all(t in of and of[t]["selection_seeds"] == seeds[of[t]["family"]] for t in targets):
            ranked.append((setting, float(np.mean([math.log(of[t]["selection"][0]) for t in targets]))))
    ranked.sort(key=lambda x: x[1])
    return (ranked[0][0] if ranked else None), ranked


def settings_markdown(rows: list[dict], config: dict, dense: dict) -> str:
    corpora = list(config["evaluation"]["perplexity"]["corpora"])
    tasks = list(config["evaluation"]["zero_shot"]["tasks"])
    head = (["setting", "lever", "k", "seeds"] + [f"ppl {c}" for c in corpora] + ["selection score"]
            + tasks + ["mean acc", "compression s", "peak RSS MiB"])
    lines = ["| " + " | ".join(head) + " |", "|:---|:---|" + "---:|" * (len(head) - 2)]
    d_acc = dense["acc"]
    d_mean = float(np.mean([a for a, _ in d_acc.values()])) if len(d_acc) == len(tasks) else math.nan
    d_sel = (math.exp(np.mean([math.log(dense["ppl"][c]) for c in SELECTION]))
             if all(c in dense["ppl"] for c in SELECTION) else math.nan)
    lines.append("| dense | | 0 | | " + " | ".join(fmt((dense["ppl"].get(c, math.nan), math.nan), 2) for c in corpora)
                 + f" | {fmt((d_sel, math.nan), 2)} | "
                 + " | ".join(fmt(d_acc.get(t, (math.nan, math.nan)), 1) for t in tasks)
                 + f" | {fmt((d_mean, math.nan), 1)} | | |")
    for row in sorted(rows, key=lambda r: (r["k"], r["family"] != "wikitext2",
                                           list(LEVERS).index(r["method"]) if r["method"] in LEVERS else 99, r["family"])):
        cells = [row["setting"], row["lever"], str(row["k"]), str(row["seeds"] or DASH)]
        cells += [fmt(row.get(c, (math.nan, math.nan)), 2) for c in corpora]
        cells += [fmt(row["selection"], 2)]
        cells += [fmt(row["acc"].get(t, (math.nan, math.nan)), 1) for t in tasks]
        cells += [fmt(row["mean_acc"], 1), fmt(row["compression_seconds"], 0), fmt(row["peak_rss_mib"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_markdown(chosen: str | None, rows: list[dict], baselines: list[dict], config: dict) -> str:
    """The chosen setting against every baseline and the paper's setting, column by column."""
    if chosen is None:
        return "No setting is complete (every target, every seed) yet: nothing chosen.\n"
    columns = [(c, 2, "low", f"ppl {c}") for c in REPORTED] + [("mean_acc", 1, "high", "mean acc")]
    lines = ["| k | column | " + chosen + " | best other | its value | " + chosen + " ahead by | noise |",
             "|---:|:---|---:|:---|---:|---:|---:|"]
    for target, spec in config["targets"].items():
        of = {r["setting"]: r for r in rows + baselines if r["target"] == target}
        mine = of.get(chosen)
        others = [r for name, r in of.items() if name in BASELINES or name == "flattengpt-paper"]
        for column, digits, better, header in columns:
            have = [r for r in others if math.isfinite(r[column][0])]
            if mine is None or not math.isfinite(mine[column][0]) or not have:
                lines.append(f"| {spec['remove_blocks']} | {header} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} |")
                continue
            sign = 1 if better == "low" else -1
            best = min(have, key=lambda r: sign * r[column][0])
            ahead = sign * (best[column][0] - mine[column][0])
            rel = f" ({100 * ahead / best[column][0]:+.0f}%)" if better == "low" else ""
            a, b = mine[column][1], best[column][1]
            if better == "high":
                noise = math.sqrt(a ** 2 + b ** 2) if math.isfinite(a) and math.isfinite(b) else math.nan
            else:
                noise = max([x for x in (a, b) if math.isfinite(x)], default=math.nan)
            lines.append(f"| {spec['remove_blocks']} | {header} | {fmt(mine[column], digits)} | {best['setting']} | "
                         f"{fmt(best[column], digits)} | {ahead:+,.{digits}f}{rel} | {fmt((noise, math.nan), digits)} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- results:begin (written by summarize.py) -->", "<!-- results:end -->"


def main() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    rows, dense = settings_rows(config)
    baselines = baseline_rows(config)
    chosen, ranked = choose(rows, config)
    units = driver.all_units(config)
    done = sum(driver.is_done(u) for u in units)
    text = "\n".join([
        f"Units collected: {done} of {len(units)} (`run.py --config {CONFIG.relative_to(HERE.parents[1])} --dry-run` "
        "lists the rest).", "",
        "### Every setting", "",
        "Perplexity: mean over the calibration seeds collected ± half their spread, first 8 windows of 2048 "
        "tokens of each corpus. Selection score: geometric mean of the two selection perplexities (the only "
        "numbers the choice reads). Accuracies (%): seed 0, first 500 items, ± lm-eval's standard error. "
        "Compression s and peak RSS: the compress stage's wall time and memory (compression.json; "
        "2 cores shared with another benchmark, see its units.jsonl for the load).", "",
        settings_markdown(rows, config, dense),
        "### The choice", "",
        "Settings complete at every target with every seed, by mean log selection score over the targets "
        "(lower is better):", "",
        "\n".join(f"{i + 1}. `{name}`: {math.exp(score):.2f}" for i, (name, score) in enumerate(ranked)) or "none yet",
        "",
        "### The chosen setting against the baselines", "",
        "Baselines from the methods comparison (ShortGPT, SLEB, ReplaceMe) and the paper's setting. `ahead by`: "
        "positive where the chosen setting is better (perplexity: relative to the best other). `noise`: the "
        "larger seed half spread (perplexity) or the combined standard error (accuracy).", "",
        verdict_markdown(chosen, rows, baselines, config),
    ])
    (HERE / "summary.md").write_text("# FlattenGPT levers: summary\n\n" + text)
    readme = HERE / "README.md"
    current = readme.read_text() if readme.is_file() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n\n" + text.strip() + "\n\n" + END + rest.split(END, 1)[1])
    print(text)


if __name__ == "__main__":
    main()
