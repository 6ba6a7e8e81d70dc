"""Peak memory of the activations stage against model depth.

For randomly initialised Llama models of 12, 24 and 48 blocks (same width), measure in a fresh
process each:
  - blockwise: `compute_activations` (one block resident at a time), and
  - full model: `from_pretrained` + one forward with output_hidden_states (what a naive
    implementation does),
and the process's baseline after importing torch and transformers. Results go to
benchmarks/activations_memory.{json,md}.

    .venv/bin/python benchmarks/activations_memory.py            # about 3 minutes on 2 cores
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
WIDTH = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)
N_SAMPLES, SEQ_LEN = 16, 256


def worker(mode: str, model_dir: str) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (code both modes load: part of the baseline)

    from flattengpt.runtime import peak_rss_mib

    torch.set_num_threads(2)
    baseline = peak_rss_mib()
    input_ids = torch.randint(0, WIDTH["vocab_size"], (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if mode == "blockwise":
        from flattengpt.activations import compute_activations

        with tempfile.TemporaryDirectory() as tmp:
            compute_activations(model_dir, input_ids, Path(tmp) / "acts", state_dir=Path(tmp) / "state",
                                batch_size=8)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for i in range(0, N_SAMPLES, 8):
                model(input_ids[i:i + 8], output_hidden_states=True)
    return {"mode": mode, "baseline_mib": round(baseline, 1), "peak_mib": round(peak_rss_mib(), 1),
            "seconds": round(time.perf_counter() - start, 2)}


def make_model(path: Path, depth: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=depth, **WIDTH))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "MODEL_DIR"))
    parser.add_argument("--make", nargs=2, metavar=("DEPTH", "MODEL_DIR"))
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.make:
        print(make_model(Path(args.make[1]), int(args.make[0])))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            model_dir = Path(tmp) / f"llama-{depth}"
            # Build the model in its own process so this one stays small.
            out = subprocess.run([sys.executable, __file__, "--make", str(depth), str(model_dir)],
                                 capture_output=True, text=True, check=True)
            params = int(out.stdout.strip().splitlines()[-1])
            size_mib = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
            for mode in ("blockwise", "full"):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, str(model_dir)],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result.update(depth=depth, params_m=round(params / 1e6, 1), model_mib=round(size_mib, 1),
                              above_baseline_mib=round(result["peak_mib"] - result["baseline_mib"], 1))
                rows.append(result)
                print(result, flush=True)

    (HERE / "activations_memory.json").write_text(json.dumps(
        {"width": WIDTH, "n_samples": N_SAMPLES, "seq_len": SEQ_LEN, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Activations stage: peak memory against depth",
        "",
        f"Random Llama models, hidden {WIDTH['hidden_size']}, intermediate {WIDTH['intermediate_size']}, "
        f"{WIDTH['num_attention_heads']} heads, vocab {WIDTH['vocab_size']}, float32; calibration "
        f"{N_SAMPLES} x {SEQ_LEN} tokens; CPU, 2 threads. Peak RSS of a fresh process; "
        "'above baseline' subtracts the RSS after importing torch and transformers' Llama modeling code.",
        "",
        "| blocks | params (M) | model on disk (MiB) | mode | peak RSS (MiB) | above baseline (MiB) | seconds |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['params_m']} | {r['model_mib']} | {r['mode']} | {r['peak_mib']} | "
                     f"{r['above_baseline_mib']} | {r['seconds']} |")
    lines += ["", "Reproduce: `.venv/bin/python benchmarks/activations_memory.py`", ""]
    (HERE / "activations_memory.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
