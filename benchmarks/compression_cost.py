"""Cost of the compression stage: time as a multiple of one dense forward pass, peak memory vs model size.

For SmolLM2-135M-Instruct (embedded) and a deep randomly initialised Llama (48 blocks), each in a
fresh process:
  - forward: one blockwise forward pass of the dense model over the calibration set (the unit of time);
  - compress: FlattenGPT compression of a greedy plan removing k blocks on the same calibration set;
peak RSS of each process (VmHWM) against the size of the model's weights on disk.

    .venv/bin/python benchmarks/compression_cost.py        # ~5 min on 2 CPU cores
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
DEEP = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False, num_hidden_layers=48)


def worker(mode: str, model_dir: str, n_samples: int, seq_len: int, remove: int, groups_file: str) -> dict:
    import torch

    import transformers.models.llama.modeling_llama  # noqa: F401  (imported by both modes)
    from flattengpt.runtime import peak_rss_mib

    torch.set_num_threads(2)
    baseline = peak_rss_mib()
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if mode == "forward":
            from flattengpt.blockwise import BlockwiseModel

            for _ in BlockwiseModel(model_dir).residual_stream(ids, batch_size=8):
                pass
        elif mode == "plan":  # activations + similarity + plan: their own stages, measured apart
            from flattengpt.activations import compute_activations
            from flattengpt.plan import greedy_plan
            from flattengpt.similarity import cosine_matrix

            compute_activations(model_dir, ids, Path(tmp) / "acts", state_dir=Path(tmp) / "s")
            groups = greedy_plan(cosine_matrix(Path(tmp) / "acts"), remove).groups
            Path(groups_file).write_text(json.dumps(groups))
        else:
            from flattengpt.compress import compress_model

            groups = json.loads(Path(groups_file).read_text())
            started = time.perf_counter()
            compress_model(model_dir, groups, ids, Path(tmp) / "out", method="flattengpt", batch_size=8)
        seconds = time.perf_counter() - started
    result = {"mode": mode, "seconds": round(seconds, 2), "baseline_mib": round(baseline, 1),
              "peak_mib": round(peak_rss_mib(), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=6)
    parser.add_argument("--make-deep")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.worker:
        mode, model_dir, n, t, k, groups_file = args.worker
        print(json.dumps(worker(mode, model_dir, int(n), int(t), int(k), groups_file)))
        return
    if args.make_deep:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**DEEP)).save_pretrained(args.make_deep)
        return

    from flattengpt.models import embedded_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        deep = Path(tmp) / "llama-48"
        subprocess.run([sys.executable, __file__, "--make-deep", str(deep)], check=True, capture_output=True)
        for name, model_dir, remove in (("SmolLM2-135M-Instruct (30 blocks)", embedded_model_dir("smollm2-135m-instruct"), 6),
                                        ("random Llama, 48 blocks, hidden 512", deep, 12)):
            size_mib = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
            row = {"model": name, "model_mib": round(size_mib, 1), "remove_blocks": remove,
                   "n_samples": args.n_samples, "seq_len": args.seq_len}
            for mode in ("forward", "plan", "compress"):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, str(model_dir), str(args.n_samples),
                                      str(args.seq_len), str(remove), str(Path(tmp) / "groups.json")],
                                     check=True, capture_output=True, text=True)
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            row["time_vs_forward"] = round(row["compress"]["seconds"] / row["forward"]["seconds"], 1)
            row["peak_vs_model_size"] = round(row["compress"]["peak_mib"] / size_mib, 2)
            row["peak_above_baseline_vs_model_size"] = round(
                (row["compress"]["peak_mib"] - row["compress"]["baseline_mib"]) / size_mib, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)

    (HERE / "compression_cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Compression cost", "",
             f"FlattenGPT compression (float32, CPU, 2 threads) on {args.n_samples} x {args.seq_len} calibration "
             "tokens, each measurement in a fresh process. Time is the compress stage alone (activations and plan "
             "are their own stages) as a multiple of one blockwise dense forward pass over the same tokens; memory "
             "is the process's peak RSS against the weights on disk ('above baseline' subtracts the RSS after "
             "importing torch and the transformers modeling code).", "",
             "| model | weights (MiB) | blocks removed | forward (s) | compress (s) | time / forward | "
             "peak RSS (MiB) | peak / weights | above baseline / weights |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['model_mib']} | {r['remove_blocks']} | {r['forward']['seconds']} | "
                     f"{r['compress']['seconds']} | {r['time_vs_forward']}x | {r['compress']['peak_mib']} | "
                     f"{r['peak_vs_model_size']} | {r['peak_above_baseline_vs_model_size']} |")
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/compression_cost.py`", ""]
    (HERE / "compression_cost.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
