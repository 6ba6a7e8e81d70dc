# Config checks, path layout and parameter lookups shared by every rule.
import json
import math
from pathlib import Path

from snakemake.exceptions import WorkflowError

from flattengpt.config import runs


SIMILARITY_FILES = [
    "cosine.csv",
    "cosine.png",
    "angular_distance.csv",
    "angular_distance.png",
    "cka.csv",
    "cka.png",
    "block_influence.csv",
    "block_influence.png",
    "similarity.json",
]


wildcard_constraints:
    model="[^/]+",
    calib="[^/]+",
    target="[^/]+",
    method="[^/]+",
    # an evaluated model: the dense one (or dense+{recovery}), or a compressed one by its {calib}/{target}/{method} path
    variant="dense|dense\+[^/]+|[^/]+/[^/]+/[^/]+",
    corpus="[^/]+",
    task="[^/]+",


def all_outputs():
    outputs = []
    for run in runs(config):
        wc = dict(model=run["model"], calib=run["calibration"], target=run["target"])
        outputs += expand("results/{model}/{calib}/{target}/{method}/plan.json", method=run["methods"], **wc)
        outputs += expand("results/{model}/{calib}/{target}/{method}/model", method=run["methods"], **wc)
        outputs += [f"results/{model}/{variant}/model" for model, variant in recovered_variants()
                    if model == run["model"] and variant.startswith(f"{run['calibration']}/{run['target']}/")]
        outputs += expand("results/{model}/{calib}/similarity/{file}", file=SIMILARITY_FILES, **wc)
    outputs += [f"results/{model}/{variant}/model" for model, variant in recovered_variants() if "/" not in variant]
    return outputs + report_outputs()


def compressed_variants():
    """(model, "calib/target/method") of every compressed checkpoint this config asks for."""
    return [(run["model"], f"{run['calibration']}/{run['target']}/{method}")
            for run in runs(config) for method in run["methods"]]


def recovered_variants():
    """(model, variant) of every recovery-tuned checkpoint (recovery: settings), each after its source.

    variant is "calib/target/method+recovery" for a compressed source (the setting's methods and targets,
    null meaning all) and "dense+recovery" for the dense model of every run's model when `dense: true`.
    """
    from flattengpt.recover import recovered_sources

    return [(model, f"{source}+{name}") for name, model, source in recovered_sources(config)]


def evaluated_variants():
    """Every evaluated model: the dense ones (if evaluation.dense), every compressed and every recovered one."""
    dense = [(m, "dense") for m in dict.fromkeys(run["model"] for run in runs(config))]
    return (dense if config["evaluation"]["dense"] else []) + compressed_variants() + recovered_variants()


def recovery_names_regex():
    import re

    return "|".join(re.escape(name) for name in config["recovery"]) or "(?!)"


def recover_dense_inputs(wildcards):
    """The dense model (model.json names its directory; a local model's files) and a local data file."""
    inputs = {"model": f"results/{wildcards.model}/model.json", "sources": model_source_files(wildcards)}
    data = config["recovery"][wildcards.recovery]["data"]
    if data["source"] == "local":
        inputs["data"] = data["path"]
    return inputs


def recover_inputs(wildcards):
    """The compressed checkpoint, its plan (for sizing) and a local data file, so that a new file reruns it."""
    base = f"results/{wildcards.model}/{wildcards.calib}/{wildcards.target}/{wildcards.method}"
    inputs = {"model": f"results/{wildcards.model}/model.json", "checkpoint": f"{base}/model",
              "plan": f"{base}/plan.json"}
    data = config["recovery"][wildcards.recovery]["data"]
    if data["source"] == "local":
        inputs["data"] = data["path"]
    return inputs


def recovery_params(wildcards):
    """A recovery setting without its methods, targets and dense keys (which say where it applies, not how)."""
    from flattengpt.config import RECOVERY_WHERE

    return {k: v for k, v in config["recovery"][wildcards.recovery].items() if k not in RECOVERY_WHERE}


def evaluation_outputs(model, variant):
    """Everything the report reads about one evaluated model."""
    evaluation = config["evaluation"]
    base = f"results/{model}/{variant}/eval"
    files = [f"{base}/perplexity/{corpus}.json" for corpus in evaluation["perplexity"]["corpora"]]
    files += [f"{base}/zero_shot/{task}.json" for task in evaluation["zero_shot"]["tasks"]]
    files.append(f"{base}/generations.json")
    # compressed models; a recovered one has its source's shapes, so it is not timed again (report_entries)
    recovered = "+" in variant
    if evaluation["speed"]["enabled"] and "/" in variant and not recovered:
        files.append(f"{base}/speed.json")
    return files


def report_plan_figures():
    return [f"results/report/plans/{run['model']}.{run['calibration']}.{run['target']}.png" for run in runs(config)]


def report_outputs():
    outputs = ["results/report/results.csv", "results/report/results.md", "results/report/generations.md",
               "results/report/report.json"]
    if recovered_variants():
        outputs += ["results/report/recovery.csv", "results/report/recovery.md"]
    outputs += [f"results/report/perplexity_{corpus}.png" for corpus in config["evaluation"]["perplexity"]["corpora"]]
    if config["evaluation"]["zero_shot"]["tasks"]:
        outputs.append("results/report/accuracy.png")
    return outputs + report_plan_figures()


def checkpoint_input(wildcards):
    """The compressed checkpoint directory; nothing for the dense model (model.json names it)."""
    if wildcards.variant == "dense":
        return []
    return [f"results/{wildcards.model}/{wildcards.variant}/model"]


def eval_compute(wildcards):
    """Device and dtype of evaluation (evaluation.dtype, else compute.dtype), and the device map if any.

    evaluation.device_map / max_memory are passed only when set, so the params (and hence the
    results) of configs without them stay as they were.
    """
    evaluation = config["evaluation"]
    compute = {"device": config["compute"]["device"], "dtype": evaluation["dtype"] or config["compute"]["dtype"]}
    for key in ("device_map", "max_memory"):
        if evaluation.get(key) is not None:
            compute[key] = evaluation[key]
    return compute


def blockwise_eval_compute(wildcards):
    """eval_compute without the device map: perplexity runs one block at a time and never spreads a model."""
    compute = eval_compute(wildcards)
    return {key: compute[key] for key in ("device", "dtype")}


def zero_shot_compute(wildcards):
    """eval_compute, with evaluation.zero_shot.dtype in place of the dtype when set."""
    compute = eval_compute(wildcards)
    return {**compute, "dtype": config["evaluation"]["zero_shot"]["dtype"] or compute["dtype"]}


def corpus_spec(wildcards):
    return config["evaluation"]["perplexity"]["corpora"][wildcards.corpus]


def corpus_source_files(wildcards):
    spec = corpus_spec(wildcards)
    return [spec["path"]] if spec["source"] == "local" else []


def perplexity_params(wildcards):
    options = config["evaluation"]["perplexity"]
    params = {key: options[key] for key in ("seq_len", "max_windows", "batch_size")}
    if "max_windows" in corpus_spec(wildcards):  # a corpus may cap its own windows
        params["max_windows"] = corpus_spec(wildcards)["max_windows"]
    return params


def zero_shot_params(wildcards):
    options = config["evaluation"]["zero_shot"]
    params = {key: options[key] for key in ("data_dir", "limit", "num_fewshot", "batch_size")}
    if isinstance(params["limit"], dict):  # a per-task limit: only this task's value reaches its job
        params["limit"] = params["limit"].get(wildcards.task)
    return params


def zero_shot_data_file(wildcards):
    """The local JSONL of a task, so that replacing the file reruns its evaluations."""
    from flattengpt.zero_shot import LOCAL_TASKS

    data_dir = config["evaluation"]["zero_shot"]["data_dir"]
    if data_dir is None or wildcards.task not in LOCAL_TASKS:
        return []
    return [str(Path(data_dir) / LOCAL_TASKS[wildcards.task][0])]


def all_cores():
    """--cores, or 1 where a command defines none (e.g. `snakemake --report`)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


# ----------------------------------------------------------------------------- resources of heavy jobs
# One function sizes every heavy rule: stage_resources(stage) gives its gpu, mem_mb, disk_mb and
# runtime, stage_threads(stage) its threads; formulas in flattengpt/sizing.py and README "Sizing for
# 7B-70B". The callables are evaluated again right before a job runs, when model.json and plan.json
# exist, so a dry run may show bounds (fallback shapes, the largest group a target allows) where the
# submitted job gets exact figures.


def _sizing_config(spec):
    """A model's config.json for sizing: converted embedded copy, local directory or hub cache; else None."""
    from flattengpt.config import model_config_json

    if spec["source"] == "embedded":
        converted = Path(config["cache_dir"]) / "models" / spec["name"] / "config.json"
        if converted.is_file():
            return json.loads(converted.read_text())
    return model_config_json(spec)


def _model_shapes(wildcards, input):
    """Shapes from the model rule's model.json (its directory's config.json) when it has run, else the spec."""
    from flattengpt.sizing import FALLBACK_CONFIG, Shapes, SizingError

    model_json = Path(input.model)
    try:
        if model_json.is_file():
            path = Path(json.loads(model_json.read_text())["path"]) / "config.json"
            return Shapes.from_config(json.loads(path.read_text()), where=str(path))
        found = _sizing_config(model_spec(wildcards))
        if found is not None:
            return Shapes.from_config(found, where=f"models.{wildcards.model}")
    except (OSError, KeyError, ValueError, SizingError):
        pass  # sized as the fallback: the job is sized again once model.json exists
    return Shapes.from_config(FALLBACK_CONFIG)


def _plan_groups(wildcards, input):
    """The plan's groups when plan.json exists (compress), or a hand-written plan file; else None."""
    from flattengpt.provenance import read_json

    plan = getattr(input, "plan", None)
    if plan and Path(plan).is_file():
        return read_json(plan)["groups"]
    target = target_spec(wildcards) if "target" in wildcards.keys() else {}
    if target.get("plan_file"):
        import yaml

        return yaml.safe_load(Path(target["plan_file"]).read_text())["groups"]
    return None


def _removed_and_group_size(wildcards, input, shapes):
    """(k, m): blocks removed and the largest group; before the plan exists, the target's worst case."""
    groups = _plan_groups(wildcards, input)
    if groups:
        return shapes.num_layers - len(groups), max(len(g) for g in groups)
    if "target" not in wildcards.keys():
        return None, 2
    target = target_spec(wildcards)
    k = target.get("remove_blocks") or shapes.remove_blocks_for(target["ratio"])
    cap = target.get("max_group_size")
    return k, min(cap, k + 1) if cap else k + 1


def _settings(stage, wildcards, input, shapes):
    from flattengpt.sizing import Settings

    calib = config["calibration"][wildcards.calib] if "calib" in wildcards.keys() else None
    # a recovered model ({method}+{recovery}, e.g. its speed job) is sized with its source method's settings
    method = config["methods"][wildcards.method.partition("+")[0]] if "method" in wildcards.keys() else None
    k, m = _removed_and_group_size(wildcards, input, shapes)
    settings = Settings.from_config(config, calibration=calib, method=method, remove_blocks=k, group_size=m)
    if "recovery" in wildcards.keys():
        from dataclasses import replace

        settings = replace(settings, recovery=config["recovery"][wildcards.recovery])
    return settings


_needs = {}


def stage_need(stage, wildcards, input, attempt):
    """flattengpt.sizing.stage_need for this job (cached: its four resources read the same figures)."""
    from flattengpt.sizing import stage_need as size

    key = (stage, tuple(sorted(dict(wildcards).items())), attempt, Path(input.model).is_file(),
           bool(getattr(input, "plan", None)) and Path(input.plan).is_file())
    if key not in _needs:
        shapes = _model_shapes(wildcards, input)
        _needs[key] = size(stage, shapes, _settings(stage, wildcards, input, shapes), attempt)
    return _needs[key]


def cluster_run():
    """True under a cluster executor (--executor slurm / the slurm profile), dry runs included.

    The executor plugin is not known while the Snakefile is read, and a dry run swaps it for the
    `dryrun` one; `--jobs` (resource_settings.nodes) is set exactly when a non-local executor is
    named (locally `--jobs` becomes `--cores`), which is the test Snakemake's scheduler uses too.
    """
    return workflow.resource_settings.nodes is not None


def local_gpu_slots():
    """GPUs a local job may claim: 1 when one is visible (every job uses cuda:0), else 0."""
    from flattengpt.sizing import visible_gpus

    return min(1, visible_gpus())


def stage_resources(stage):
    """gpu, mem_mb, disk_mb, runtime of a heavy rule, each a function of the job and its retry attempt.

    gpu: compute.device cpu asks for none; auto and cuda* ask the cluster for the sized count, and
    locally for the one GPU slot (the Snakefile caps local GPU jobs at one at a time) if a GPU is
    visible, so the default run on a CPU machine asks for nothing. A retry asks for more memory
    (x (1 + 0.5 (attempt - 1))) and time (x attempt).
    """
    from flattengpt.sizing import retry_factor

    def gpu(wildcards, input, attempt):
        if config["compute"]["device"] == "cpu" or stage == "similarity":
            return 0
        if not cluster_run():
            return local_gpu_slots()
        return stage_need(stage, wildcards, input, attempt).gpus

    def mem_mb(wildcards, input, attempt):
        return math.ceil(stage_need(stage, wildcards, input, attempt).mem_mb * retry_factor(attempt))

    def disk_mb(wildcards, input, attempt):
        return stage_need(stage, wildcards, input, attempt).disk_mb

    def runtime(wildcards, input, attempt):
        return stage_need(stage, wildcards, input, attempt).minutes  # x attempt inside

    return {"gpu": gpu, "mem_mb": mem_mb, "disk_mb": disk_mb, "runtime": runtime}


def stage_threads(stage):
    """CPU threads of a heavy job (Snakemake scales them down to --cores; on Slurm, --cpus-per-task).

    speed asks for every core so that no other job runs beside its timings; the others compute.threads.
    """
    return all_cores() if stage == "speed" else config["compute"]["threads"]


def model_spec(wildcards):
    return config["models"][wildcards.model]


def calibration_spec(wildcards):
    return config["calibration"][wildcards.calib]


def target_spec(wildcards):
    return config["targets"][wildcards.target]


def model_source_files(wildcards):
    """A local model's config and weight index, so that replacing the model reruns what depends on it."""
    spec = model_spec(wildcards)
    if spec["source"] != "local":
        return []
    path = Path(spec["path"])
    files = [path / "config.json"]
    files += [p for p in (path / "model.safetensors.index.json", path / "model.safetensors") if p.exists()]
    return [str(f) for f in files]


def _method_class(wildcards):
    from flattengpt.methods import method_class

    return method_class(config["methods"][wildcards.method]["method"])


def method_names_regex(chooses_with):
    """The config's method names whose choice runs in the plan rule ("similarity") or the search rule ("model")."""
    import re

    from flattengpt.methods import method_class

    names = [name for name, spec in config["methods"].items()
             if chooses_with == "any" or method_class(spec["method"]).choice_source(spec) == chooses_with]
    return "|".join(re.escape(name) for name in names) or "(?!)"  # (?!) matches nothing


def choice_params(wildcards):
    """The options that change a method's choice: only these reach the plan and search rules."""
    spec = config["methods"][wildcards.method]
    return {"method": spec["method"], **_method_class(wildcards).choice_options(spec)}


def method_params(wildcards):
    """The options that change how a method builds its layers; a method without fit options never reruns for one."""
    spec = config["methods"][wildcards.method]
    return {"method": spec["method"], **_method_class(wildcards).fit_options(spec)}


def plan_inputs(wildcards):
    base = f"results/{wildcards.model}/{wildcards.calib}/similarity"
    inputs = {"model": f"results/{wildcards.model}/model.json", "cosine": f"{base}/cosine.csv",
              "angular_distance": f"{base}/angular_distance.csv", "block_influence": f"{base}/block_influence.csv"}
    spec = target_spec(wildcards)
    if spec.get("plan_file"):
        inputs["plan_file"] = spec["plan_file"]
    return inputs


def compress_inputs(wildcards):
    """The model and the method's plan, and the calibration tokens for methods that fit on them."""
    run = f"results/{wildcards.model}/{wildcards.calib}"
    inputs = {"model": f"results/{wildcards.model}/model.json",
              "plan": f"{run}/{wildcards.target}/{wildcards.method}/plan.json"}
    if _method_class(wildcards).fits:
        inputs["tokens"] = f"{run}/tokens.safetensors"
    return inputs


def compute_params(wildcards):
    """Options that change computed numbers (not threads, which do not)."""
    compute = config["compute"]
    return {key: compute[key] for key in ("device", "dtype", "batch_size")}


def report_entries():
    """What the report reads about each evaluated model (paths relative to the working directory)."""
    evaluation = config["evaluation"]
    entries = []
    for model, variant in evaluated_variants():
        base = f"results/{model}/{variant}"
        compressed = "/" in variant  # else dense or dense+{recovery}
        calib, target, method = variant.split("/") if compressed else (None, None, variant)
        # method names cannot hold "+" (schema): a recovered model is {source}+{recovery}
        source, _, recovery = method.partition("+")
        entries.append({
            "model": model, "calibration": calib, "target": target, "method": method,
            "recovered_from": source if recovery else None, "recovery": recovery or None,
            "model_json": f"results/{model}/model.json",
            "model_dir": f"{base}/model" if variant != "dense" else None,
            "compression_json": f"{base}/model/compression.json" if compressed else None,
            # a recovered model's plan is its source method's
            "plan_json": f"results/{model}/{calib}/{target}/{source}/plan.json" if compressed else None,
            "recovery_json": f"{base}/model/recovery.json" if recovery else None,
            "perplexity": {c: f"{base}/eval/perplexity/{c}.json" for c in evaluation["perplexity"]["corpora"]},
            "zero_shot": {t: f"{base}/eval/zero_shot/{t}.json" for t in evaluation["zero_shot"]["tasks"]},
            # a recovered model has its source's shapes, hence its speed: the source's timings, not timed again
            "speed": (f"results/{model}/{calib}/{target}/{source}/eval/speed.json"
                      if evaluation["speed"]["enabled"] and compressed else None),
            "generations": f"{base}/eval/generations.json",
        })
    return entries


def validated_lambda_methods():
    """The methods whose fits pick lambda on held-out calibration sequences (lambda_factor: auto)."""
    return [name for name, settings in config["methods"].items() if settings.get("lambda_factor") == "auto"]


def report_plans():
    """One figure per (model, calibration, target): the cosine heatmap with every method's plan on it."""
    return [{"model": run["model"], "calibration": run["calibration"], "target": run["target"],
             "cosine_csv": f"results/{run['model']}/{run['calibration']}/similarity/cosine.csv",
             "plan_jsons": {method: f"results/{run['model']}/{run['calibration']}/{run['target']}/{method}/plan.json"
                            for method in run["methods"]},
             "figure": f"results/report/plans/{run['model']}.{run['calibration']}.{run['target']}.png"}
            for run in runs(config)]
