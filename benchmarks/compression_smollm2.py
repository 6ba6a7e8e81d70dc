"""FlattenGPT against drop baselines on SmolLM2-135M-Instruct (restored from its 4-bit GGUF).

Protocol (issue 3):
  - calibration: random windows of WikiText-2 *validation* (the `.tokens` file in ../shared);
  - selection: perplexity on WikiText-2 validation windows that calibration did not touch, used to
    choose the compensation target and lambda;
  - report: perplexity on WikiText-2 test and on tiny Shakespeare (text unlike the calibration set);
  - 3 and 6 blocks removed; dense, `drop` (the FlattenGPT plan, first block of each group kept),
    ShortGPT (the k lowest block-influence blocks dropped), FlattenGPT for each compensation target
    and several lambda factors.

    .venv/bin/python benchmarks/compression_smollm2.py            # ~30 min on 2 CPU cores

Writes benchmarks/compression_smollm2.{json,md}. The model's numbers are not comparable with
published SmolLM2 figures (it is restored from a 4-bit GGUF).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flattengpt.activations import compute_activations
from flattengpt.checkpoint import Checkpoint
from flattengpt.compress import compress_model
from flattengpt.data import load_text, sample_windows, tokenize
from flattengpt.models import EMBEDDED_MODELS, embedded_model_dir
from flattengpt.perplexity import eval_windows, perplexity
from flattengpt.methods.shortgpt import shortgpt_blocks
from flattengpt.plan import greedy_plan
from flattengpt.provenance import package_versions, source_hash
from flattengpt.runtime import peak_rss_mib
from flattengpt.similarity import block_influence, cosine_matrix

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "text"


def windows_outside(ids: torch.Tensor, starts: list[int], seq_len: int, calib_len: int, n: int) -> torch.Tensor:
    """Non-overlapping eval windows of the stream that share no token with any calibration window."""
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for start in starts:
        used[start:start + calib_len] = True
    out = []
    for start in range(0, ids.numel() - seq_len + 1, seq_len):
        if not used[start:start + seq_len].any():
            out.append(ids[start:start + seq_len])
        if len(out) == n:
            break
    return torch.stack(out)


def groups_dropping(blocks: list[int], num_layers: int) -> list[list[int]]:
    """A partition whose `drop` removes exactly `blocks`: each removed block joins the kept block before it."""
    assert 0 not in blocks, "drop keeps the first block of each group, so block 0 cannot be dropped this way"
    groups: list[list[int]] = []
    for block in range(num_layers):
        if block in blocks and groups:
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--select-windows", type=int, default=16)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    parser.add_argument("--removes", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--targets", nargs="+", default=["flattened", "original"])
    parser.add_argument("--attn-compensation", action="store_true", help="o_proj ridge refit ([choice], off)")
    parser.add_argument("--max-group-size", type=int, default=None)
    parser.add_argument("--protect-first", action="store_true")
    parser.add_argument("--protect-last", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="add FlattenGPT variants (and the drop of their plan) to the existing JSON")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((HERE / "compression_smollm2.json").read_text()))
        return
    torch.set_num_threads(2)

    model_dir = embedded_model_dir("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = {}
    for name, path in (("wikitext2-valid", "wikitext-2.wiki.valid.tokens"), ("wikitext2-test", "wikitext-2.wiki.test.tokens"),
                       ("tinyshakespeare", "tinyshakespeare.input.txt")):
        stream[name] = tokenize(tokenizer, load_text({"source": "local", "path": str(SHARED / path)})[0])
    calib, starts = sample_windows(stream["wikitext2-valid"], args.n_samples, args.seq_len, args.seed)
    texts = {
        "select (wiki valid, unused)": windows_outside(stream["wikitext2-valid"], starts, args.seq_len, args.seq_len,
                                                       args.select_windows),
        "wikitext2-test": eval_windows(stream["wikitext2-test"], args.seq_len, args.eval_windows),
        "tinyshakespeare": eval_windows(stream["tinyshakespeare"], args.seq_len, args.eval_windows),
    }
    previous = json.loads((HERE / "compression_smollm2.json").read_text()) if args.append else None
    rows = previous["rows"] if previous else []

    def evaluate(label: str, k: int, path: Path, extra: dict) -> None:
        row = {"model": label, "removed": k, **extra}
        for text_name, windows in texts.items():
            row[text_name] = round(perplexity(path, windows, batch_size=8)["perplexity"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        dense_forward = compute_activations(model_dir, calib, tmp / "acts", state_dir=tmp / "acts-state")
        forward_seconds = time.perf_counter() - started
        S = cosine_matrix(tmp / "acts")
        bi = block_influence(S)
        num_layers = Checkpoint(model_dir).adapter.num_layers
        if not args.append:
            evaluate("dense", 0, model_dir, {"seconds": None})

        plan_options = {"max_group_size": args.max_group_size, "protect_first": args.protect_first,
                        "protect_last": args.protect_last}
        plan_label = "".join([f" max_group_size={args.max_group_size}" if args.max_group_size else "",
                              " protect_first" if args.protect_first else "",
                              " protect_last" if args.protect_last else ""])
        for k in args.removes:
            plan = greedy_plan(S, k, **plan_options)
            variants = [(f"drop (FlattenGPT plan{plan_label})", plan.groups, {"method": "drop"})]
            if not args.append:
                variants.append(("ShortGPT (lowest BI, dropped)", groups_dropping(shortgpt_blocks(bi, k), num_layers),
                                 {"method": "drop"}))
            elif not plan_label:
                variants = []  # the plan's drop is already in the table
            for target in args.targets:
                for lam in args.lambdas:
                    label = f"FlattenGPT {target} lambda={lam:g}" + (" +o_proj refit" if args.attn_compensation else "")
                    variants.append((label + plan_label, plan.groups,
                                     {"method": "flattengpt", "compensation_target": target, "lambda_factor": lam,
                                      "attn_compensation": args.attn_compensation}))
            for label, groups, options in variants:
                out = tmp / f"k{k}-{len(rows)}"
                started = time.perf_counter()
                compress_model(model_dir, groups, calib, out, state_dir=tmp / "state", **options)
                seconds = time.perf_counter() - started
                evaluate(label, k, out, {"seconds": round(seconds, 1), "groups": [g for g in groups if len(g) > 1]})

    if previous:
        previous["appended"] = previous.get("appended", []) + [" ".join(sys.argv[1:])]
        (HERE / "compression_smollm2.json").write_text(json.dumps(previous, indent=2) + "\n")
        render(previous)
        return
    result = {
        "model": "SmolLM2-135M-Instruct (embedded)", "note": EMBEDDED_MODELS["smollm2-135m-instruct"]["note"],
        "calibration": {"text": "wikitext-2.wiki.valid.tokens", "n_samples": args.n_samples, "seq_len": args.seq_len,
                        "seed": args.seed, "dense_forward_seconds": round(forward_seconds, 2),
                        "activations_seconds": dense_forward["seconds"]},
        "eval": {name: {"windows": int(w.shape[0]), "seq_len": int(w.shape[1])} for name, w in texts.items()},
        "rows": rows, "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version()},
        "versions": package_versions(), "flattengpt_source_sha256": source_hash(),
    }
    (HERE / "compression_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    render(result)


def render(result: dict) -> None:
    """compression_smollm2.md from the JSON: every run, then the setting chosen on validation text."""
    rows, cal = result["rows"], result["calibration"]
    names = list(result["eval"])
    select, tests = names[0], names[1:]
    lines = ["# FlattenGPT vs drop baselines on SmolLM2-135M-Instruct", "", f"_{result['note']}_", "",
             f"Calibration: {cal['n_samples']} x {cal['seq_len']} tokens of WikiText-2 validation (seed {cal['seed']}); "
             f"one dense forward pass over them takes {cal['dense_forward_seconds']} s. Perplexity at seq_len "
             f"{cal['seq_len']}: settings are chosen on {result['eval'][select]['windows']} WikiText-2 validation "
             "windows that no calibration window touches, and reported on the first "
             f"{result['eval'][tests[0]]['windows']} windows of WikiText-2 test and of tiny Shakespeare (text unlike "
             "the calibration set). CPU, 2 threads; 'compress s' is the compression alone.", ""]
    lines += ["## Chosen on validation, reported on test", "",
              "| removed | model | " + " | ".join(tests) + " |", "|---:|---|" + "---:|" * len(tests)]
    dense = next(r for r in rows if r["removed"] == 0)
    lines.append("| 0 | dense | " + " | ".join(str(dense[t]) for t in tests) + " |")
    for k in sorted({r["removed"] for r in rows} - {0}):
        at_k = [r for r in rows if r["removed"] == k]
        flatten = [r for r in at_k if r["model"].startswith("FlattenGPT")]
        chosen = min(flatten, key=lambda r: r[select])
        literal = next((r for r in flatten if r["model"] == "FlattenGPT flattened lambda=10"), None)
        picks = [r for r in at_k if not r["model"].startswith("FlattenGPT")]
        picks += [{**chosen, "model": f"**{chosen['model']}** (chosen on validation)"}]
        if literal is not None and literal is not chosen:
            picks.append({**literal, "model": f"{literal['model']} (the paper's setting)"})
        for r in picks:
            lines.append(f"| {k} | {r['model']} | " + " | ".join(str(r[t]) for t in tests) + " |")
    lines += ["", "## Every run", "", "| removed | model | " + " | ".join(names) + " | compress s | groups |",
              "|---:|---|" + "---:|" * len(names) + "---:|---|"]
    for r in rows:
        lines.append(f"| {r['removed']} | {r['model']} | " + " | ".join(str(r[n]) for n in names)
                     + f" | {r['seconds'] if r['seconds'] is not None else ''} | {r.get('groups', '')} |")
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/compression_smollm2.py --lambdas 0.1 1 10 100` "
              "(about 45 min on 2 CPU cores); `--render-only` rewrites this file from the JSON."]
    lines += [f"Rows added with `.venv/bin/python benchmarks/compression_smollm2.py {extra}`"
              for extra in result.get("appended", [])]
    lines.append("")
    (HERE / "compression_smollm2.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
