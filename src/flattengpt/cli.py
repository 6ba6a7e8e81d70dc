"""`flattengpt`: read the workflow's results as plain text.

    flattengpt plan RESULTS_PATH          the flattening plan(s): groups, removed blocks, parameters, greedy steps
    flattengpt similarity RESULTS_PATH    the most similar residual points, the lowest block influence
    flattengpt show RESULTS_DIR           both, for every similarity/ folder and plan.json below RESULTS_DIR

Only pandas and numpy are imported (no torch), so looking at results is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .plan import Plan, span_text

MATRIX_FILES = {"cosine": "cosine.csv", "cka": "cka.csv", "angular_distance": "angular_distance.csv",
                "block_influence": "block_influence.csv"}


class CliError(Exception):
    pass


# ----------------------------------------------------------------------------- text helpers


def table(headers: Sequence[str], rows: Sequence[Sequence], indent: str = "  ") -> str:
    """Fixed-width columns; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float, np.number)) for row in rows) for i in range(len(headers))]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = []
    for line in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric)]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _visible(path: Path, root: Path) -> bool:
    """Skip hidden folders below the root (.snakemake shadows, temporary files)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


# ----------------------------------------------------------------------------- plans


def find_plans(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CliError(f"{path} does not exist")
    if (path / "plan.json").is_file():
        return [path / "plan.json"]
    found = sorted(p for p in path.rglob("plan.json") if _visible(p, path))
    if not found:
        raise CliError(f"no plan.json in or below {path}; run the workflow's plan step first")
    return found


def format_plan(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        plan = Plan.from_json(record)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"{path} is not a plan.json ({err})") from err
    options = plan.options
    source = options.get("source", "greedy")
    target = ", ".join(f"{k}={v}" for k, v in plan.target.items() if v is not None) or "-"
    summary = [
        ("method", f"{plan.method} ({'greedy search' if source == 'greedy' else 'plan written by hand'})"),
        ("target", target),
        ("options", f"max_group_size={options.get('max_group_size') or 'unlimited'}, "
                    f"protect_first={options.get('protect_first', False)}, "
                    f"protect_last={options.get('protect_last', False)}"),
        ("blocks", f"{plan.num_layers} -> {len(plan.groups)} (k = {plan.remove_blocks} removed)"),
        ("removed blocks", ", ".join(map(str, plan.removed_blocks)) or "none"),
    ]
    if plan.params_before is not None:
        summary.append(("parameters", f"{plan.params_before:,} -> {plan.params_after:,} "
                                      f"(ratio removed {plan.ratio_achieved:.4f})"))
    note = (record.get("model") or {}).get("note")
    if note:
        summary.append(("note", note))
    lines = [f"== plan {path}"] + [f"  {name:<15} {value}" for name, value in summary]
    lines += ["", "  groups (one line per block of the compressed model):"]
    lines += [f"    {line}" for line in plan.describe_groups()]
    lines.append("")
    if plan.steps:
        lines.append("  greedy steps (merge the adjacent pair with the largest S[a, c]):")
        rows = [(s["step"], span_text(s["left"]), span_text(s["right"]), span_text(s["merged"]),
                 f"{s['score']:.6f}") for s in plan.steps]
        lines.append(table(["step", "left", "right", "merged", "score S[a,c]"], rows, indent="    "))
    else:
        lines.append(f"  no greedy steps: the groups come from {plan.target.get('plan_file', 'a plan file')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- similarity


def find_similarity_dirs(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path.parent]
    if not path.is_dir():
        raise CliError(f"{path} does not exist")
    found = sorted({p.parent for name in MATRIX_FILES.values() for p in path.rglob(name) if _visible(p, path)})
    if not found:
        raise CliError(f"no similarity results (cosine.csv, ...) in or below {path}; run the similarity step first")
    return found


def _read_matrix(path: Path) -> tuple[np.ndarray, list[str]]:
    frame = pd.read_csv(path, index_col=0)
    return frame.to_numpy(dtype=np.float64), [str(c) for c in frame.columns]


def top_pairs(matrix: np.ndarray, top: int, largest: bool, max_gap: int | None = None) -> list[tuple[int, int, float]]:
    """The `top` off-diagonal pairs i < j by value (largest or smallest first; ties by i, then j)."""
    rows, cols = np.triu_indices(matrix.shape[0], k=1)
    if max_gap is not None:
        keep = cols - rows <= max_gap
        rows, cols = rows[keep], cols[keep]
    values = matrix[rows, cols]
    order = np.lexsort((cols, rows, -values if largest else values))[:top]
    return [(int(rows[n]), int(cols[n]), float(values[n])) for n in order]


def format_similarity(sim_dir: Path, matrices: Sequence[str], top: int, max_gap: int | None = None) -> str:
    lines = [f"== similarity {sim_dir}"]
    meta_path = sim_dir / "similarity.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        counts = {name: info.get("tokens") for name, info in meta.get("matrices", {}).items()}
        lines.append(f"  {meta.get('num_layers')} blocks; X0 = embeddings, X{meta.get('num_layers')} = last block's "
                     f"output before the final norm; tokens: cosine {counts.get('cosine')}, angular distance "
                     f"{counts.get('angular_distance')} (last tokens), CKA {counts.get('cka')}")
        if meta.get("note"):
            lines.append(f"  note: {meta['note']}")
    for name in matrices:
        path = sim_dir / MATRIX_FILES[name]
        lines.append("")
        if not path.is_file():
            lines.append(f"  {name}: {path.name} not found")
            continue
        if name == "block_influence":
            frame = pd.read_csv(path).sort_values(["rank", "block"]).head(top)
            lines.append(f"  block influence BI = 1 - S[l, l+1], {len(frame)} lowest (ShortGPT removes these first):")
            rows = [(int(r.rank), int(r.block), r.input, r.output, f"{r.block_influence:.6f}")
                    for r in frame.itertuples()]
            lines.append(table(["rank", "block", "input", "output", "BI"], rows, indent="    "))
            continue
        matrix, labels = _read_matrix(path)
        largest = name != "angular_distance"
        pairs = top_pairs(matrix, top, largest=largest, max_gap=max_gap)
        what = "most similar" if largest else "closest (smallest distance)"
        gap_note = f", j - i <= {max_gap}" if max_gap is not None else ""
        lines.append(f"  {name}: {len(pairs)} {what} pairs (i < j{gap_note}):")
        rows = [(rank, labels[i], labels[j], j - i, f"{value:.6f}") for rank, (i, j, value) in enumerate(pairs, 1)]
        lines.append(table(["rank", "i", "j", "j-i", name], rows, indent="    "))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def cmd_plan(args) -> int:
    print("\n\n".join(format_plan(path) for path in find_plans(args.path)))
    return 0


def cmd_similarity(args) -> int:
    matrices = list(MATRIX_FILES) if args.matrix == "all" else [args.matrix]
    print("\n\n".join(format_similarity(d, matrices, args.top, args.max_gap)
                      for d in find_similarity_dirs(args.path)))
    return 0


def cmd_show(args) -> int:
    root = Path(args.path)
    if not root.is_dir():
        raise CliError(f"{root} is not a directory")
    sim_dirs = _try(find_similarity_dirs, root)
    plans = _try(find_plans, root)
    if not sim_dirs and not plans:
        raise CliError(f"no similarity results or plan.json below {root}; run the workflow first")
    sections, shown = [], set()
    for sim_dir in sim_dirs:
        sections.append(format_similarity(sim_dir, list(MATRIX_FILES), args.top))
        # the plans made from this similarity sit beside it: {calibration}/{target}/plan.json
        for plan in plans:
            if plan.is_relative_to(sim_dir.parent) and plan not in shown:
                sections.append(format_plan(plan))
                shown.add(plan)
    sections += [format_plan(plan) for plan in plans if plan not in shown]
    print("\n\n".join(sections))
    return 0


def _try(finder, path) -> list[Path]:
    try:
        return finder(path)
    except CliError:
        return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flattengpt", description="Read FlattenGPT workflow results as text.")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="print flattening plan(s): a plan.json, or every plan.json below a folder")
    plan.add_argument("path", metavar="RESULTS_PATH")
    plan.set_defaults(func=cmd_plan)

    sim = commands.add_parser("similarity", help="print the top entries of the similarity views")
    sim.add_argument("path", metavar="RESULTS_PATH", help="a similarity folder, a file in it, or a folder above it")
    sim.add_argument("--matrix", choices=[*MATRIX_FILES, "all"], default="all")
    sim.add_argument("--top", type=int, default=10, help="entries per view (default 10)")
    sim.add_argument("--max-gap", type=int, default=None, help="only pairs with j - i <= MAX_GAP")
    sim.set_defaults(func=cmd_similarity)

    show = commands.add_parser("show", help="similarity and plans of every run below RESULTS_DIR")
    show.add_argument("path", metavar="RESULTS_DIR")
    show.add_argument("--top", type=int, default=10)
    show.set_defaults(func=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top", 1) < 1:
        print("flattengpt: --top must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CliError as err:
        print(f"flattengpt: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
