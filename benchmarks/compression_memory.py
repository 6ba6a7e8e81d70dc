"""Peak memory of compressing one flattened pair at a realistic width, against group_memory_bytes.

A random LLaMA-architecture model (hidden 4096, intermediate 11008, 32 heads: LLaMA-2-7B's block
width; 3 blocks, vocab 512, float32) is saved into a temporary directory; the plan [[0], [1, 2]]
flattens one pair (n = 2 x 11008 = 22016, the Gram matrix alone is 3.9 GB). compress_model runs on
the CPU in a fresh subprocess, so its peak RSS (VmHWM) is its own. The channel-selection step alone
is also measured, new and former (HEAD~ dense: C + lambda I, its factor, the full inverse), on a
random PSD matrix of size --leverage-n, as the peak RSS above C itself.

    .venv/bin/python benchmarks/compression_memory.py            # writes benchmarks/compression_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))


def child_compress(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = Path(args.tmp)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_hidden_layers=3, vocab_size=512,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "model")  # in a process of its own: see main()
    return {}


def child_run(args) -> dict:
    import torch

    from flattengpt.compress import compress_model

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 512, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    root = Path(args.tmp)
    base = kib("VmRSS")
    started = time.perf_counter()
    record = compress_model(root / "model", [[0], [1, 2]], ids, root / "out", batch_size=args.batch_size,
                            compensation_target=args.target)
    return {"peak_rss_bytes": kib("VmHWM") * 1024, "rss_before_bytes": base * 1024,
            "seconds": round(time.perf_counter() - started, 1), "pair_seconds": record["group_stats"][1]["seconds"],
            "mlp_solve": record["group_stats"][1]["mlp"]["solve"]}


OLD_LEVERAGE = """
def old_leverage(C, lam):  # HEAD~ before this change: C + lam I, its Cholesky factor and the full inverse
    import torch
    A = C.clone()
    A.diagonal().add_(lam)
    return 1 - lam * torch.cholesky_inverse(torch.linalg.cholesky(A)).diagonal()
"""


def child_leverage(args) -> dict:
    import torch

    from flattengpt import prune

    torch.set_num_threads(args.threads)
    n, hidden = args.leverage_n, args.hidden
    g = torch.Generator().manual_seed(0)
    C = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(2):  # C = psi^T psi, full rank, built without an n x 2n psi
        psi = torch.randn(n // 2 + 100, n, generator=g, dtype=torch.float64)
        C.addmm_(psi.T, psi)
        del psi
    W = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    base = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak above C and W
    lam = prune.ridge_lambda(C, 10.0)
    started = time.perf_counter()
    if args.which == "old":
        namespace: dict = {}
        exec(OLD_LEVERAGE, namespace)
        namespace["old_leverage"](C, lam)
        step = "leverage scores only"
    else:
        prune.select_channels(C, W, n // 2, lam)
        step = "leverage scores + C_SS + compensation + fit errors"
    return {"n": n, "which": args.which, "step": step, "extra_peak_bytes": (kib("VmHWM") - base) * 1024,
            "n2_float64_bytes": n * n * 8, "seconds": round(time.perf_counter() - started, 1)}


def run_child(kind: str, args, **extra) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--tmp", str(args.tmp)]
    for key, value in {**vars(args), **extra}.items():
        if key not in ("child", "tmp") and value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--target", default="flattened")
    parser.add_argument("--leverage-n", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--which", default="new")
    parser.add_argument("--child")
    parser.add_argument("--tmp")
    parser.add_argument("--out", default=str(HERE / "compression_memory"))
    args = parser.parse_args()
    if args.child:
        result = {"save": child_compress, "compress": child_run, "leverage": child_leverage}[args.child](args)
        print(json.dumps(result))
        return

    import torch

    from flattengpt.adapters import BlockShape
    from flattengpt.methods.flattengpt import group_memory_bytes

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        args.tmp = tmp
        run_child("save", args)
        compress = run_child("compress", args)
    leverage = {which: run_child("leverage", args, which=which) for which in ("new", "old")}
    shape = BlockShape(args.hidden, args.heads, args.heads, args.hidden // args.heads, args.intermediate, False, False)
    formula = group_memory_bytes(shape, 2, compute_dtype_bytes=4, batch_size=args.batch_size, seq_len=args.seq_len,
                                 compensation_target=args.target, solve_device="auto", n_samples=args.samples,
                                 device="cpu")
    n = 2 * args.intermediate
    result = {
        "command": "python benchmarks/compression_memory.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "tmp", "out", "which")},
        "torch": torch.__version__,
        "pair_n": n, "pair_gram_bytes": n * n * 8,
        "compress_model": compress,
        "formula_bytes": formula,
        "measured_over_formula": round(compress["peak_rss_bytes"] / formula["host"], 3),
        "channel_step": leverage,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    lines = [
        "# Compression memory (CPU, float32, one flattened LLaMA-2-7B-width pair)", "",
        f"Command: `{result['command']}` (torch {torch.__version__}, {args.threads} threads).", "",
        "| what | measured peak | formula / reference |", "|---|---|---|",
        f"| compress_model, plan [[0], [1, 2]], n = {n} | {compress['peak_rss_bytes'] / gib:.2f} GiB RSS "
        f"| group_memory_bytes: {formula['host'] / gib:.2f} GiB (Gram alone {n * n * 8 / gib:.2f} GiB) |",
    ]
    for which, r in leverage.items():
        lines.append(f"| channel step, {which} ({r['step']}), n = {r['n']} | +{r['extra_peak_bytes'] / gib:.3f} GiB "
                     f"above C ({r['extra_peak_bytes'] / r['n2_float64_bytes']:.2f} n^2 float64), {r['seconds']} s "
                     f"| one n^2 float64 = {r['n2_float64_bytes'] / gib:.3f} GiB |")
    lines += ["", f"compress_model took {compress['seconds']} s (the pair {compress['pair_seconds']} s); "
              f"MLP solve: relative residual {compress['mlp_solve']['relative_residual']:.2e}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
