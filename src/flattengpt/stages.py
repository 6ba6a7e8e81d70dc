"""One function per workflow stage: files in, files out, no Snakemake.

The rule scripts in scripts/ only unpack the `snakemake` object and call these, so every stage can
be run and tested from Python, and the algorithms stay in their own modules.
"""

from __future__ import annotations

import json
import logging
import time
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

    from .data import build_calibration, describe_text, save_tokens

    model = read_json(model_json)
    tokenizer = AutoTokenizer.from_pretrained(model["path"])
    windows, info = build_calibration(tokenizer, spec, n_samples=spec["n_samples"], seq_len=spec["seq_len"],
                                      seed=spec["seed"])
    info = {**info, "model_fingerprint": model["fingerprint"], "provenance": provenance,
            "preview": tokenizer.decode(windows[0, :64])}
    save_tokens(out_tokens, windows, info)
    write_json(out_info, info)
    log.info("calibration: %d windows of %d tokens (seed %d) from %s", windows.shape[0], windows.shape[1],
             spec["seed"], describe_text(spec))
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


def _choice(model: dict, spec: dict, target: dict):
    """(method, k) of a plan or search job, checked before any work: k is None for a plan_file target."""
    from .methods import MethodError, get_method
    from .plan import target_blocks

    method = get_method(spec)
    if target.get("plan_file") and not method.reads_plan_file:
        raise MethodError(f"method {method.name}: a plan_file lists flattening groups, which only the flattening "
                          f"methods (flattengpt, drop, flatten-only) read; give this target remove_blocks or ratio")
    num_layers = len(model["parameters"]["per_block"])
    k = None if target.get("plan_file") else target_blocks(target, model["parameters"], num_layers)
    return method, k


def _write_plan(plan, method, target: dict, model: dict, out_json, provenance: dict, started: float):
    from .plan import count_parameters

    plan.method = method.name
    plan.target = dict(target)
    plan.options = {**plan.options, **method.choice_options(method.recorded_options())}
    plan.cost = {"block_forwards": 0, **plan.cost, "seconds": round(time.perf_counter() - started, 3)}
    count_parameters(plan, model["parameters"])
    for line in plan.describe_groups():
        log.info("%s", line)
    log.info("%s removes %d of %d blocks: %.1fM -> %.1fM parameters (ratio %.4f), %d block forwards",
             method.name, plan.remove_blocks, plan.num_layers, plan.params_before / 1e6, plan.params_after / 1e6,
             plan.ratio_achieved, plan.cost["block_forwards"])
    record = {**plan.to_json(), "model": {"path": model["path"], "note": model.get("note")},
              "provenance": provenance}
    write_json(out_json, record)
    return plan


def plan_stage(model_json: str | Path, similarity: dict, target: dict, method: dict, out_json: str | Path,
               provenance: dict):
    """A method's plan from the similarity views (`similarity`: cosine, angular_distance, block_influence CSVs)."""
    from .methods import SimilarityViews

    started = time.perf_counter()
    model = read_json(model_json)
    chosen, k = _choice(model, method, target)
    if chosen.choice_source(chosen.options) != "similarity":
        raise ValueError(f"method {chosen.name} chooses from the model (the search rule), not the similarity views")
    views = SimilarityViews.load(similarity["cosine"], similarity.get("angular_distance"),
                                 similarity.get("block_influence"))
    provenance = {**provenance, "inputs": {"model_fingerprint": model["fingerprint"],
                                           **{f"{name}_sha256": file_sha256(path) for name, path in similarity.items()}}}
    plan = chosen.choose(k, views=views, target=target)
    return _write_plan(plan, chosen, target, model, out_json, provenance, started)


def search_stage(model_json: str | Path, tokens: str | Path, target: dict, method: dict, compute: dict,
                 state_dir: str | Path | None, out_json: str | Path, provenance: dict):
    """A method's plan from a search on the model and the calibration tokens (SLEB, LaCo, SLM); resumable."""
    from .blockwise import BlockwiseModel
    from .data import load_tokens
    from .methods import SearchInputs

    started = time.perf_counter()
    model = read_json(model_json)
    chosen, k = _choice(model, method, target)
    if chosen.choice_source(chosen.options) != "model":
        raise ValueError(f"method {chosen.name} chooses from the similarity views (the plan rule), not a search")
    input_ids, _ = load_tokens(tokens)
    provenance = {**provenance, "inputs": {"model_fingerprint": model["fingerprint"],
                                           "tokens_sha256": file_sha256(tokens)}}
    runner = BlockwiseModel(model["path"], device=compute["device"], dtype=compute["dtype"])
    search = SearchInputs(runner=runner, input_ids=input_ids, batch_size=compute["batch_size"],
                          state_dir=Path(state_dir) if state_dir else None, log=log.info)
    plan = chosen.choose(k, search=search, target=target)
    return _write_plan(plan, chosen, target, model, out_json, provenance, started)


def compress_stage(model_json: str | Path, tokens: str | Path | None, plan_json: str | Path, out_dir: str | Path,
                   state_dir: str | Path, method: dict, compute: dict, provenance: dict) -> dict:
    """Apply a method's plan: build every output layer and write a standard checkpoint."""
    from .compress import compress_model
    from .data import load_tokens
    from .methods import get_method
    from .plan import Plan

    model = read_json(model_json)
    chosen = get_method(method)
    plan = Plan.from_json(read_json(plan_json))
    input_ids = load_tokens(tokens)[0] if chosen.fits else None
    inputs = {"model_fingerprint": model["fingerprint"], "plan_sha256": file_sha256(plan_json)}
    if chosen.fits:
        inputs["tokens_sha256"] = file_sha256(tokens)
    record = compress_model(model["path"], plan, input_ids, out_dir, method=chosen,
                            device=compute["device"], dtype=compute["dtype"], batch_size=compute["batch_size"],
                            state_dir=state_dir, provenance={**provenance, "inputs": inputs,
                                                             "model_note": model.get("note")})
    log.info("%s: %d -> %d blocks written to %s", chosen.name, record["num_layers"]["original"],
             record["num_layers"]["compressed"], out_dir)
    return record


def recover_stage(model_json: str | Path, model_dir: str | Path | None, settings: dict, compute: dict,
                  state_dir: str | Path, out_dir: str | Path, provenance: dict) -> dict:
    """Recovery-tune a compressed checkpoint (flattengpt.recover); its compression.json is carried over.

    `model_dir` None tunes the dense model (model.json's directory), for comparison; its output has
    recovery.json but no compression.json.
    """
    import shutil

    from .config import RECOVERY_KEYS
    from .data import load_text
    from .recover import hub_data_file, hub_data_location, recover

    data = settings["data"]
    if data["source"] == "embedded":  # the text itself; a local file is read (and hashed) by recover
        text, info = load_text({"source": "embedded", "name": data["name"]})
        spec = {"text": text}
    elif data["source"] == "hub":  # a dataset repository's file, through the Hugging Face cache
        repo, file, revision = hub_data_location(data)
        path = hub_data_file(data)
        spec = {"path": str(path), "kind": data.get("kind", "auto")}
        info = {"source": "hub", "repo": repo, "file": file, "revision": revision, "path": str(path)}
    else:
        spec, info = {"path": data["path"], "kind": data.get("kind", "auto")}, {"source": "local"}
    options = {k: v for k, v in settings.items() if k not in RECOVERY_KEYS}
    model = read_json(model_json)
    inputs = {"model_fingerprint": model["fingerprint"], "data": info}
    if model_dir is None:
        source = model["path"]
        inputs["source"] = "dense"
    else:
        source = model_dir
        inputs["compression_json_sha256"] = file_sha256(Path(model_dir) / "compression.json")
    record = recover(source, spec, out_dir, options=options, state_dir=state_dir, device=compute["device"],
                     dtype="auto", log=log.info, job_provenance={**provenance, "inputs": inputs})
    if model_dir is not None:
        # evaluation and the report read the architecture's record beside the weights, as for any compressed model
        shutil.copyfile(Path(model_dir) / "compression.json", Path(out_dir) / "compression.json")
    return record


# ----------------------------------------------------------------------------- evaluation

def _evaluated(model_json: str | Path, model_dir: str | Path | None) -> tuple[str, dict]:
    """The checkpoint to evaluate (a compressed directory, or the dense model) and its inputs record."""
    model = read_json(model_json)
    if model_dir is None:
        return model["path"], {"model": "dense", "model_fingerprint": model["fingerprint"]}
    if not (Path(model_dir) / "compression.json").is_file() and (Path(model_dir) / "recovery.json").is_file():
        # the dense model after recovery tuning (recover_dense): same architecture, no compression record
        return str(model_dir), {"model": "recovered dense", "model_fingerprint": model["fingerprint"],
                                "recovery_json_sha256": file_sha256(Path(model_dir) / "recovery.json")}
    record = read_json(Path(model_dir) / "compression.json")
    return str(model_dir), {"model": "compressed", "compression_json_sha256": file_sha256(Path(model_dir) / "compression.json"),
                            "model_fingerprint": model["fingerprint"], "method": record.get("method")}


def perplexity_stage(model_json: str | Path, model_dir: str | Path | None, corpus: str, spec: dict, options: dict,
                     compute: dict, out_json: str | Path, provenance: dict, state_dir: str | Path | None = None,
                     checkpoint_every: int | None = None) -> dict:
    """Perplexity on one corpus (METHOD.md section 6): non-overlapping windows of seq_len tokens.

    With `state_dir`, the per-window sums are saved every `checkpoint_every` windows and a rerun
    resumes from them (the result is identical to an uninterrupted run's).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .data import load_text, tokenize, tokenizer_info
    from .perplexity import eval_windows, perplexity

    path, inputs = _evaluated(model_json, model_dir)
    seq_len = options["seq_len"]
    max_positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"evaluation.perplexity.seq_len: {seq_len} exceeds the model's max_position_embeddings "
                         f"({max_positions}); lower it")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text, text_info = load_text(spec)
    max_windows = options.get("max_windows")
    # with max_windows, only the text those windows need is tokenised (a prefix of the same ids)
    needed = None if max_windows is None else max_windows * seq_len
    ids = tokenize(tokenizer, text, max_tokens=needed)
    whole = needed is None or ids.numel() < needed
    windows = eval_windows(ids, seq_len, max_windows)
    log.info("perplexity on %s: %s%d tokens -> %d windows of %d", corpus, "" if whole else "the first ",
             ids.numel(), windows.shape[0], seq_len)
    from .blockwise import resolve_device

    device = str(resolve_device(compute["device"]))
    from .provenance import json_sha256

    result = perplexity(path, windows, device=device, dtype=compute["dtype"], batch_size=options["batch_size"],
                        checkpoint_every=checkpoint_every, state_dir=state_dir, fingerprint=json_sha256(inputs))
    record = {"corpus": corpus, **result, "n_tokens_in_corpus": int(ids.numel()) if whole else None,
              "n_tokens_tokenized": int(ids.numel()),
              "max_windows": options.get("max_windows"), "text": text_info, "tokenizer": tokenizer_info(tokenizer),
              "device": device, "dtype": compute["dtype"], "model_dir": path,
              "provenance": {**provenance, "inputs": inputs}}
    log.info("perplexity %s = %.3f (%d windows, %d predicted tokens)", corpus, result["perplexity"],
             result["n_windows"], result["n_predicted_tokens"])
    write_json(out_json, record)
    return record


def zero_shot_stage(model_json: str | Path, model_dir: str | Path | None, task: str, options: dict, compute: dict,
                    out_json: str | Path, provenance: dict) -> dict:
    """One lm-eval task, zero-shot; the record names the metric, the lm-eval version and the data file."""
    from .blockwise import resolve_device
    from .zero_shot import evaluate_task

    from .provenance import json_sha256

    path, inputs = _evaluated(model_json, model_dir)
    # Scored requests are kept as they come, outside the declared output (which Snakemake deletes
    # before a rerun), under a name that changes with the model, the task and every option.
    resume_dir = Path(out_json).parent.parent / ".resume"
    key = json_sha256({"inputs": inputs, "task": task, "options": options, "dtype": compute["dtype"]})[:16]
    resume_dir.mkdir(parents=True, exist_ok=True)
    cache = resume_dir / f"zero_shot.{task}.{key}"
    record = evaluate_task(path, task, data_dir=options.get("data_dir"), limit=options.get("limit"),
                           num_fewshot=options["num_fewshot"], batch_size=options["batch_size"],
                           device=str(resolve_device(compute["device"])), dtype=compute["dtype"],
                           resume_cache=cache, device_map=compute.get("device_map"),
                           max_memory=compute.get("max_memory"))
    for stale in resume_dir.glob(f"zero_shot.{task}.*"):
        stale.unlink()
    if record["data_file"]:
        inputs["data_file_sha256"] = file_sha256(record["data_file"])
    record.update(model_dir=path, provenance={**provenance, "inputs": inputs})
    write_json(out_json, record)
    return record


def speed_stage(model_json: str | Path, model_dir: str | Path, options: dict, compute: dict, out_json: str | Path,
                provenance: dict, state_dir: str | Path | None = None) -> dict:
    """Prefill throughput and decode latency of the dense and the compressed model, in interleaved rounds.

    With `state_dir`, the memory pass and finished timed rounds are saved there and a rerun after an
    interruption measures only what is left (the record's `resume` says so).
    """
    from .provenance import json_sha256
    from .speed import measure_speed

    dense, inputs = _evaluated(model_json, None)
    _, compressed_inputs = _evaluated(model_json, model_dir)
    settings = {key: options[key]
                for key in ("batch_size", "prompt_len", "decode_tokens", "warmup", "repeats", "interleave")}
    record = measure_speed({"dense": dense, "compressed": str(model_dir)}, device=compute["device"],
                           dtype=compute["dtype"], state_dir=state_dir, device_map=compute.get("device_map"),
                           max_memory=compute.get("max_memory"),
                           resume_key=json_sha256({**inputs, **compressed_inputs}), **settings)
    record["provenance"] = {**provenance, "inputs": {**inputs, **compressed_inputs}}
    write_json(out_json, record)
    return record


def generation_stage(model_json: str | Path, model_dir: str | Path | None, options: dict, compute: dict,
                     out_json: str | Path, provenance: dict) -> dict:
    """Greedy completions of fixed prompts, to eyeball what compression did to the model's text.

    `compute` may carry `device_map` and `max_memory` (evaluation.device_map / max_memory) to spread
    the model over several GPUs; the record's `device_map` says where it ran (null: on `device`).
    """
    from transformers import AutoTokenizer

    from .blockwise import resolve_device
    from .inference import device_map_summary, load_causal_lm
    from .speed import generate_samples

    path, inputs = _evaluated(model_json, model_dir)
    device = str(resolve_device(compute["device"]))
    device_map, max_memory = compute.get("device_map"), compute.get("max_memory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path, device=device, dtype=compute["dtype"], device_map=device_map, max_memory=max_memory)
    outputs = generate_samples(model, tokenizer, list(options["prompts"]), max_new_tokens=options["max_new_tokens"])
    placement = None if device_map is None else device_map_summary(model, device_map, max_memory)
    del model
    record = {"outputs": outputs, "max_new_tokens": options["max_new_tokens"], "greedy": True,
              "device": device, "dtype": compute["dtype"], "device_map": placement, "model_dir": path,
              "provenance": {**provenance, "inputs": inputs}}
    write_json(out_json, record)
    return record


def report_stage(entries: list[dict], plans: list[dict], outputs: dict, provenance: dict) -> "pd.DataFrame":
    """The results table (CSV + Markdown), its plots, the plan heatmaps and the sample generations.

    With recovered models, outputs["recovery_csv"] / ["recovery_markdown"] get their change against
    their sources (report.recovery_table).
    """
    from .report import (generations_markdown, plot_plan, plot_vs_blocks, recovery_table, results_table,
                         variant_label, write_recovery, write_table)
    from .provenance import atomic_path

    def as_list(value) -> list[str]:
        return [value] if isinstance(value, str) else [str(v) for v in value]

    table = results_table(entries)
    notes = sorted({read_json(e["model_json"]).get("note") for e in entries} - {None})
    notes.append("perplexity: lower is better; task columns: lm-eval accuracy in % (acc_norm where the task has "
                 "it, acc for WinoGrande); retention = mean_acc / dense mean_acc; speedups: compressed over dense, "
                 "medians of timed runs in one process (interleaved rounds unless evaluation.speed.interleave is "
                 "false); ideal_speedup = L / (L - k)")
    if table["recovered_from"].notna().any():
        notes.append("method {source}+{recovery}: the source model (recovered_from) after that recovery: setting, "
                     "right below its source; its choice and compression columns are the source's, recovery_seconds "
                     "is the tuning; a recovered dense model is not timed (the dense architecture); the change "
                     "against the source in every column: recovery.md")
    write_table(table, outputs["csv"], outputs["markdown"], title="flattengpt results", notes=notes)
    log.info("results table: %d rows x %d columns", *table.shape)
    if outputs.get("recovery_csv"):
        deltas = recovery_table(table)
        write_recovery(deltas, as_list(outputs["recovery_csv"])[0], as_list(outputs["recovery_markdown"])[0],
                       notes=["delta = recovered - source, delta % relative to the source; source: the same model, "
                              "calibration and target without recovery (the dense model for dense+{recovery})",
                              "± stderr (task accuracies): sqrt(se_source^2 + se_recovered^2), ignoring that both "
                              "models answer the same items",
                              "better: perplexity and decode latency lower, accuracies, retention and throughput "
                              "higher; empty where a column has no direction"])
        log.info("recovery table: %d recovered models", deltas["recovered"].nunique())

    for path in as_list(outputs.get("perplexity", [])):
        corpus = Path(path).stem.removeprefix("perplexity_")
        plot_vs_blocks(table, f"ppl_{corpus}", path, ylabel=f"perplexity ({corpus})",
                       title=f"Perplexity on {corpus} vs blocks removed", log_y=True)
    for path in as_list(outputs.get("accuracy", [])):
        plot_vs_blocks(table, "mean_acc", path, ylabel="mean zero-shot accuracy (%)",
                       title="Mean zero-shot accuracy vs blocks removed")
    if outputs.get("lambda_picks"):  # only where a method has lambda_factor auto
        from .report import lambda_picks, plot_lambda_picks

        picks = lambda_picks(entries)
        with atomic_path(as_list(outputs["lambda_picks_csv"])[0]) as tmp:
            picks.to_csv(tmp, index=False)
        for path in as_list(outputs["lambda_picks"]):
            plot_lambda_picks(picks, path)
        log.info("validated lambda picks: %d fits", len(picks))
    for plan in plans:
        plot_plan(plan["cosine_csv"], plan["plan_jsons"], plan["figure"],
                  title=f"{plan['model']} / {plan['calibration']} / {plan['target']}: cosine similarity and "
                        "every method's choice")

    generations = [(variant_label(e), read_json(e["generations"])) for e in entries
                   if e.get("generations") and Path(e["generations"]).is_file()]
    with atomic_path(outputs["generations"]) as tmp:
        Path(tmp).write_text(generations_markdown(generations))

    write_json(outputs["record"], {
        "rows": json.loads(table.to_json(orient="records")),
        "columns": list(table.columns),
        "entries": entries,
        "inputs_sha256": {path: file_sha256(path) for e in entries for path in _entry_files(e)},
        "provenance": provenance,
    })
    return table


def _entry_files(entry: dict) -> list[str]:
    files = [entry.get("model_json"), entry.get("compression_json"), entry.get("plan_json"), entry.get("recovery_json"),
             entry.get("speed"), entry.get("generations"), *entry.get("perplexity", {}).values(),
             *entry.get("zero_shot", {}).values()]
    return [f for f in files if f and Path(f).is_file()]
