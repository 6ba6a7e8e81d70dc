"""Condense the workflow's results table into the benchmark summary: seed mean and spread per setting.

    .venv/bin/python benchmarks/paper_protocol/summarize.py [results/report/results.csv]

Copies the full table next to this script (results.csv, results.md), the report's plots, sample
generations and plan heatmaps into figures/, and writes summary.md: for
dense and each (method, blocks removed), the mean over calibration seeds and, beside it, the
spread (max - min), so the seed-to-seed variation can be read next to the differences.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
TASKS = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    metrics = [c for c in table.columns if c.startswith("ppl_")] + [t for t in TASKS if t in table] + [
        "mean_acc", "retention", "prefill_speedup", "decode_speedup", "ideal_speedup", "param_ratio"]
    rows = []
    for (method, removed), group in table.groupby(["method", "blocks_removed"], sort=False):
        row = {"method": method, "blocks_removed": int(removed), "seeds": len(group)}
        for metric in metrics:
            values = group[metric].dropna()
            row[metric] = values.mean() if len(values) else float("nan")
            row[f"{metric}_spread"] = values.max() - values.min() if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("blocks_removed", kind="stable")


def markdown(frame: pd.DataFrame) -> str:
    def cell(metric: str, row) -> str:
        value, spread = row[metric], row.get(f"{metric}_spread", float("nan"))
        if pd.isna(value):
            return "–"
        digits = 3 if metric.endswith(("speedup", "ratio", "retention")) else 2 if metric.startswith("ppl_") else 1
        text = f"{value:.{digits}f}"
        return text if pd.isna(spread) else f"{text} ± {spread / 2:.{digits}f}"

    metrics = [c for c in frame.columns if not c.endswith("_spread") and c not in ("method", "blocks_removed", "seeds")]
    lines = ["| method | removed | seeds | " + " | ".join(metrics) + " |",
             "|---|---:|---:|" + "---:|" * len(metrics)]
    for _, row in frame.iterrows():
        lines.append(f"| {row['method']} | {row['blocks_removed']} | {row['seeds']} | "
                     + " | ".join(cell(m, row) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "results/report/results.csv")
    table = pd.read_csv(source)
    shutil.copy(source, HERE / "results.csv")
    shutil.copy(source.with_suffix(".md"), HERE / "results.md")
    # The plots, sample generations and plan heatmaps, so the benchmark can be read without a rerun.
    figures = HERE / "figures"
    figures.mkdir(exist_ok=True)
    for path in [*source.parent.glob("*.png"), source.parent / "generations.md", *source.parent.glob("plans/*.png")]:
        if path.is_file():
            shutil.copy(path, figures / path.name)
    text = ("Mean over calibration seeds ± half the spread (max - min) between them; accuracies in %.\n\n"
            + markdown(summary(table)))
    (HERE / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
