"""One function per workflow stage: files in, files out, no Snakemake.

The rule scripts in scripts/ only unpack the `snakemake` object and call these, so every stage can
be run and tested from Python, and the algorithms stay in their own modules.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from .checkpoint import Checkpoint
from .provenance import file_sha256, read_json, write_json

log = logging.getLogger(__name__)


def model_stage(spec: dict, cache_dir: str | Path, out_json: str | Path, provenance: dict) -> dict:
    """Resolve the model to a local directory and describe it (shapes, exact parameter counts)."""
    from .models import EMBEDDED_MODELS, describe_model, resolve_model

    path = Path(resolve_model(spec, cache_dir=cache_dir)).resolve()
    checkpoint = Checkpoint(path)
    adapter = checkpoint.adapter  # raises for unsupported architectures
    note = EMBEDDED_MODELS[spec["name"]]["note"] if spec["source"] == "embedded" else None
    info = {
        "path": str(path),
        "source": spec["source"],
        "note": note,
        **describe_model(path),
        "block_shape": asdict(adapter.shape),
        "parameters": checkpoint.parameter_counts(),
        "fingerprint": checkpoint.fingerprint(),
        "provenance": provenance,
    }
    if note:
        log.warning("%s", note)
    log.info("model %s: %d blocks, %.1fM parameters (%.2fM per block)", path, adapter.num_layers,
             info["parameters"]["total"] / 1e6, info["parameters"]["per_block"][0] / 1e6)
    write_json(out_json, info)
    return info


def calibration_stage(model_json: str | Path, spec: dict, out_tokens: str | Path, out_info: str | Path,
                      provenance: dict) -> dict:
    """Tokenize the calibration text and draw the seeded windows."""
    from transformers import AutoTokenizer

    from .data import build_calibration, save_tokens

    model = read_json(model_json)
    tokenizer = AutoTokenizer.from_pretrained(model["path"])
    windows, info = build_calibration(tokenizer, spec, n_samples=spec["n_samples"], seq_len=spec["seq_len"],
                                      seed=spec["seed"])
    info = {**info, "model_fingerprint": model["fingerprint"], "provenance": provenance,
            "preview": tokenizer.decode(windows[0, :64])}
    save_tokens(out_tokens, windows, info)
    write_json(out_info, info)
    log.info("calibration: %d windows of %d tokens (seed %d) from %s", windows.shape[0], windows.shape[1],
             spec["seed"], spec.get("name") or spec.get("path"))
    return info


def activations_stage(model_json: str | Path, tokens: str | Path, out_dir: str | Path, state_dir: str | Path,
                      options: dict, compute: dict, provenance: dict) -> dict:
    from .activations import compute_activations
    from .data import load_tokens

    model = read_json(model_json)
    input_ids, _ = load_tokens(tokens)
    provenance = {**provenance, "inputs": {"model_fingerprint": model["fingerprint"],
                                           "tokens_sha256": file_sha256(tokens)}}
    return compute_activations(
        model["path"], input_ids, out_dir, state_dir=state_dir,
        store_dtype=options["store_dtype"], max_tokens=options["max_tokens"],
        checkpoint_every=options["checkpoint_every"],
        device=compute["device"], dtype=compute["dtype"], batch_size=compute["batch_size"],
        provenance=provenance,
    )


def similarity_stage(model_json: str | Path, act_dir: str | Path, out_dir: str | Path, options: dict,
                     provenance: dict) -> dict:
    from .similarity import compute_all

    note = read_json(model_json).get("note")
    manifest = read_json(Path(act_dir) / "manifest.json")
    provenance = {**provenance, "inputs": {"activations_manifest_sha256": file_sha256(Path(act_dir) / "manifest.json"),
                                           **manifest.get("provenance", {}).get("inputs", {})}}
    return compute_all(act_dir, out_dir, cka_max_tokens=options["cka_max_tokens"], seed=options["seed"],
                       provenance=provenance, note=note)


def plan_stage(model_json: str | Path, cosine_csv: str | Path, target: dict, out_json: str | Path,
               provenance: dict):
    from .plan import make_plan
    from .similarity import load_matrix

    model = read_json(model_json)
    similarity, _ = load_matrix(cosine_csv)
    provenance = {**provenance, "inputs": {"model_fingerprint": model["fingerprint"],
                                           "cosine_sha256": file_sha256(cosine_csv)}}
    options = {key: target.get(key) for key in ("max_group_size", "protect_first", "protect_last")}
    plan = make_plan(similarity, model["parameters"], target, options)
    for line in plan.describe_groups():
        log.info("%s", line)
    log.info("removes %d of %d blocks: %.1fM -> %.1fM parameters (ratio %.4f)", plan.remove_blocks,
             plan.num_layers, plan.params_before / 1e6, plan.params_after / 1e6, plan.ratio_achieved)
    record = {**plan.to_json(), "model": {"path": model["path"], "note": model.get("note")},
              "provenance": provenance}
    write_json(out_json, record)
    return plan


def compress_stage(model_json: str | Path, tokens: str | Path, plan_json: str | Path, out_dir: str | Path,
                   state_dir: str | Path, method: dict, compute: dict, provenance: dict) -> dict:
    """Apply a plan: FlattenGPT (flatten + prune), or the drop / flatten-only ablations."""
    from .compress import compress_model
    from .data import load_tokens

    model = read_json(model_json)
    plan = read_json(plan_json)
    input_ids, _ = load_tokens(tokens)
    provenance = {**provenance, "inputs": {"model_fingerprint": model["fingerprint"],
                                           "tokens_sha256": file_sha256(tokens),
                                           "plan_sha256": file_sha256(plan_json)}}
    options = {key: method[key] for key in ("lambda_factor", "compensation_target", "attn_compensation",
                                            "head_scoring") if key in method}
    record = compress_model(model["path"], plan["groups"], input_ids, out_dir, method=method["method"],
                            device=compute["device"], dtype=compute["dtype"], batch_size=compute["batch_size"],
                            state_dir=state_dir, provenance={**provenance, "model_note": model.get("note")},
                            **options)
    log.info("%s: %d -> %d blocks written to %s", method["method"], record["num_layers"]["original"],
             record["num_layers"]["compressed"], out_dir)
    return record
