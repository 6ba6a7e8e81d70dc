"""`flattengpt`: read the workflow's results as plain text.

    flattengpt plan RESULTS_PATH          the flattening plan(s): groups, removed blocks, parameters, greedy steps
    flattengpt similarity RESULTS_PATH    the most similar residual points, the lowest block influence
    flattengpt show RESULTS_DIR           both, for every similarity/ folder and plan.json below RESULTS_DIR
    flattengpt resources CONFIG_JSON      GPU memory, host memory, disk, GPUs and runtime of every heavy stage
    flattengpt resources-table            the README's sizing table (LLaMA-2 7B/13B/70B); --readme rewrites it

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
    source = options.get("source")
    flattening = source is not None  # the greedy flattening plan or a plan file (flattengpt, drop, flatten-only)
    target = ", ".join(f"{k}={v}" for k, v in plan.target.items() if v is not None) or "-"
    how = {"greedy": "greedy flattening plan", "file": "plan written by hand"}.get(source, "its own choice")
    shown = {k: v for k, v in options.items() if k not in ("source", "groups")}
    summary = [
        ("method", f"{plan.method} ({how})"),
        ("target", target),
        ("options", ", ".join(f"{k}={'unlimited' if k == 'max_group_size' and v is None else v}"
                              for k, v in shown.items()) or "-"),
        ("blocks", f"{plan.num_layers} -> {len(plan.layers)} (k = {plan.remove_blocks} removed)"),
        ("removed blocks", ", ".join(map(str, plan.removed_blocks)) or "none"),
    ]
    if plan.params_before is not None:
        summary.append(("parameters", f"{plan.params_before:,} -> {plan.params_after:,} "
                                      f"(ratio removed {plan.ratio_achieved:.4f})"))
    if plan.cost:
        summary.append(("choice cost", ", ".join(f"{k}={v}" for k, v in plan.cost.items())))
    note = (record.get("model") or {}).get("note")
    if note:
        summary.append(("note", note))
    lines = [f"== plan {path}"] + [f"  {name:<15} {value}" for name, value in summary]
    lines += ["", "  layers (one line per block of the compressed model):"]
    lines += [f"    {line}" for line in plan.describe_groups()]
    lines.append("")
    if plan.steps and flattening:
        lines.append("  greedy steps (merge the adjacent pair with the largest S[a, c]):")
        rows = [(s["step"], span_text(s["left"]), span_text(s["right"]), span_text(s["merged"]),
                 f"{s['score']:.6f}") for s in plan.steps]
        lines.append(table(["step", "left", "right", "merged", "score S[a,c]"], rows, indent="    "))
    elif plan.steps:
        lines.append(f"  trace of the choice ({len(plan.steps)} steps; all of them in plan.json):")
        lines += [f"    {json.dumps(step, sort_keys=False)[:160]}" for step in plan.steps[:20]]
    elif flattening:
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


def cmd_cancel_orphans(args) -> int:
    from .slurm import OrphanJobsError, cancel_orphans

    try:
        jobs = cancel_orphans(args.directory, dry_run=args.dry_run)
    except OrphanJobsError as err:
        raise CliError(str(err)) from err
    verb = "live" if args.dry_run else "cancelled"
    for job in jobs:
        print(f"{verb}: {job.describe()}")
    if not jobs:
        print("no live Slurm jobs of earlier runs of this directory")
    return 0


def _try(finder, path) -> list[Path]:
    try:
        return finder(path)
    except CliError:
        return []


def cmd_resources(args) -> int:
    from . import sizing

    try:
        shapes = sizing.Shapes.from_config(sizing.model_config(args.config_json), where=str(args.config_json))
        overrides = {key: value for key, value in (
            ("n_samples", args.n_samples), ("seq_len", args.seq_len), ("dtype", args.dtype),
            ("batch_size", args.batch_size), ("store_dtype", args.store_dtype), ("device", args.device),
            ("group_size", args.group_size)) if value is not None}
        if args.dtype is not None:  # evaluation.dtype null follows compute.dtype
            overrides.update(eval_dtype=args.dtype, zero_shot_dtype=args.dtype)
        if args.max_tokens is not None:
            overrides["max_tokens"] = None if args.max_tokens == 0 else args.max_tokens
        if args.gpu_memory_gb is not None:
            overrides["gpu_memory_bytes"] = int(args.gpu_memory_gb * sizing.GIB)
        k = args.remove_blocks
        if k is None and args.ratio is not None:
            k = shapes.remove_blocks_for(args.ratio)
        settings = sizing.default_settings(remove_blocks=k, **overrides)
    except (sizing.SizingError, OSError, ValueError) as err:
        raise CliError(str(err)) from err
    print(f"{args.config_json}: {shapes.model_type}, {shapes.num_layers} blocks, hidden {shapes.hidden}, "
          f"intermediate {shapes.intermediate}, heads {shapes.heads} (KV {shapes.kv_heads}, head_dim {shapes.head_dim}), "
          f"vocab {shapes.vocab}, tied embeddings {shapes.tied}, stored as {shapes.weight_dtype}")
    print(f"parameters: {shapes.total_params:,} ({shapes.block_params:,} per block); k = {k or 0} blocks removed")
    print(sizing.settings_line(settings))
    rows, notes = [], []
    for stage in sizing.STAGES:
        need = sizing.stage_need(stage, shapes, settings)
        rows.append((stage, need.gpus, round(need.device_bytes / sizing.GIB, 1), round(need.host_bytes / sizing.GIB, 1),
                     round(need.disk_bytes / sizing.GIB, 1), need.minutes, need.mem_mb))
        notes += need.notes
    print(table(["stage", "GPUs", "GPU GiB", "host GiB", "disk GiB", "runtime min", "mem_mb"], rows))
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_resources_table(args) -> int:
    from . import sizing

    if args.readme:
        changed = sizing.update_readme(args.readme)
        print(f"{args.readme}: sizing section {'rewritten' if changed else 'already current'}")
        return 0
    print(sizing.paper_table())
    return 0


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

    res = commands.add_parser("resources", help="what each heavy stage needs for a model, from its config.json")
    res.add_argument("config_json", metavar="CONFIG_JSON",
                     help="a Hugging Face config.json, the model directory, or a results/{model}/model.json")
    res.add_argument("--n-samples", type=int, help="calibration sequences (schema default otherwise)")
    res.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    res.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute and evaluation dtype")
    res.add_argument("--batch-size", type=int, help="compute.batch_size")
    res.add_argument("--store-dtype", choices=["float32", "bfloat16", "float16"], help="activations.store_dtype")
    res.add_argument("--max-tokens", type=int, help="activations.max_tokens (0: store every token)")
    res.add_argument("--device", help="compute.device (cpu puts everything in host memory)")
    res.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU (cluster.gpu_memory_gb)")
    res.add_argument("--remove-blocks", type=int, help="k, blocks the plan removes")
    res.add_argument("--ratio", type=float, help="or the fraction of parameters removed (gives k)")
    res.add_argument("--group-size", type=int, help="blocks per flattened group (default 2)")
    res.set_defaults(func=cmd_resources)

    res_table = commands.add_parser("resources-table", help="the README sizing table: LLaMA-2 7B/13B/70B")
    res_table.add_argument("--readme", metavar="README", help="rewrite the sizing section of this README instead")
    res_table.set_defaults(func=cmd_resources_table)

    orphans = commands.add_parser(
        "cancel-orphans", help="scancel the Slurm jobs that killed Snakemake runs of this directory left running")
    orphans.add_argument("--directory", default=".", help="the workflow's working directory (default .)")
    orphans.add_argument("--dry-run", action="store_true", help="list the jobs, cancel nothing")
    orphans.set_defaults(func=cmd_cancel_orphans)
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
