"""Zero-shot accuracy through lm-eval's Python API (METHOD.md section 6).

A task is named as lm-eval names it (`piqa`, `arc_easy`, ...). With `data_dir` unset, lm-eval's
stock task runs and fetches its dataset from the hub. With `data_dir` set, the five paper tasks
(LOCAL_TASKS) run from local JSONL files in the hub datasets' own layout, through the task configs
shipped in `flattengpt/lm_eval_tasks/`: the stock prompts, choices, targets and metrics with only
the dataset swapped (tests/test_zero_shot.py checks the rendering against the stock configs row by
row). Any other task name still goes to lm-eval's registry.

The headline metric is `acc_norm` where the task has it and `acc` otherwise (WinoGrande), as in the
paper; lm-eval's standard error of that metric is kept beside it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from pathlib import Path

from .request_cache import json_request_cache

log = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"  # the version the shipped task configs were checked against
PAPER_TASKS = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
# task -> (file in the lm_eval_jsonl layout, split it is read as)
LOCAL_TASKS = {
    "piqa": ("piqa_validation.jsonl", "validation"),
    "arc_easy": ("arc_easy_test.jsonl", "test"),
    "arc_challenge": ("arc_challenge_test.jsonl", "test"),
    "hellaswag": ("hellaswag_validation.jsonl", "validation"),
    "winogrande": ("winogrande_validation.jsonl", "validation"),
}


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"zero-shot evaluation needs lm-eval: pip install lm-eval=={LM_EVAL_VERSION}") from None


def local_data_file(task: str, data_dir: str | Path) -> Path:
    """The JSONL file a local task reads, with a clear error when it is missing."""
    if task not in LOCAL_TASKS:
        raise ValueError(f"no shipped local config for task {task!r}; local tasks are {sorted(LOCAL_TASKS)}. "
                         "Leave evaluation.zero_shot.data_dir unset to run it from the hub.")
    path = Path(data_dir) / LOCAL_TASKS[task][0]
    if not path.is_file():
        raise FileNotFoundError(f"evaluation.zero_shot.data_dir: {path} not found (the layout of "
                                f"shared/data/tasks/lm_eval_jsonl: {', '.join(f for f, _ in LOCAL_TASKS.values())})")
    return path


def local_task_config(task: str, data_dir: str | Path) -> dict:
    """The shipped config of `task` (functions resolved) with its data file filled in."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{task}.yaml")
    split = LOCAL_TASKS[task][1]
    config["dataset_kwargs"] = {"data_files": {split: str(local_data_file(task, data_dir).resolve())}}
    return config


def stock_task_config(task: str, data_file: str | Path | None = None, split: str | None = None) -> dict:
    """lm-eval's own config of `task` (functions resolved); optionally pointed at a local file."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_yaml = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                  "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml"}[task]
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / stock_yaml)
    if data_file is not None:
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(data_file)}})
        # the local file holds only `split`: drop the stock config's other splits (its training split
        # would otherwise be looked up for few-shot docs and fail with KeyError: 'train')
        for key in ("training_split", "validation_split", "test_split"):
            if config.get(key) != split:
                config[key] = None
    return config


def build_task(task: str, data_dir: str | Path | None = None):
    """An lm-eval Task object for a local task, or the stock task name for lm-eval to resolve."""
    if data_dir is None or task not in LOCAL_TASKS:
        return task
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=local_task_config(task, data_dir))


def headline_metric(metrics: dict) -> str:
    """acc_norm where the task reports it, else acc (the paper's choice)."""
    names = {key.split(",")[0] for key in metrics}
    for name in ("acc_norm", "acc"):
        if name in names:
            return name
    raise ValueError(f"task reports neither acc_norm nor acc: {sorted(names)}")


def evaluate_task(model_dir: str | Path, task: str, *, data_dir: str | Path | None = None,
                  limit: int | float | None = None, num_fewshot: int = 0, batch_size: int | str = 16,
                  device: str = "cpu", dtype: str = "float32", seed: int = 1234,
                  resume_cache: str | Path | None = None, device_map: str | None = None,
                  max_memory: dict | None = None) -> dict:
    """Zero-shot score of the checkpoint in `model_dir` on one task, as a JSON-able record.

    `resume_cache` (a path prefix) keeps every scored request in a JSON Lines request cache
    (`<prefix>_rank0.jsonl`, request_cache.py; never lm-eval's pickling SQLite) as it is computed,
    so a killed run resumes where it stopped. The caller must make the prefix unique
    to the model, dtype and task: lm-eval keys the cache by request text alone.

    `device_map` (with `max_memory`) spreads the model over the GPUs of a node. The model is then
    loaded by flattengpt.inference.load_causal_lm, as speed and generation load it, and handed to
    HFLM as a model object; lm-eval puts its inputs on the model's first parameter, the embedding
    (checked below). lm-eval's own `parallelize=True` is not used: it takes one memory cap for
    every GPU and, with no GPU visible, passes accelerate an empty `max_memory`, which offloads the
    whole model to disk.
    """
    version = lm_eval_version()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    placement = None
    if device_map is None and max_memory is None:  # lm-eval loads the checkpoint itself, as it always did
        lm = HFLM(pretrained=str(model_dir), device=device, dtype=dtype, batch_size=batch_size)
    else:
        from .inference import device_map_summary, input_device, load_causal_lm

        # attn_implementation=None: transformers' default, as lm-eval's own loading uses
        model = load_causal_lm(model_dir, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                               attn_implementation=None)
        placement = device_map_summary(model, device_map, max_memory)
        lm = HFLM(pretrained=model, batch_size=batch_size)  # the tokenizer comes from model.name_or_path
        if lm.device != input_device(model):
            raise RuntimeError(f"lm-eval would send inputs to {lm.device}, the embedding is on {input_device(model)}")
    task_obj = build_task(task, data_dir)
    # a built local task needs no registry: skip indexing lm-eval's thousands of stock YAMLs (10-20 s a call)
    task_manager = None if isinstance(task_obj, str) else TaskManager(include_defaults=False)
    # the request cache is JSON lines (request_cache.py): lm-eval's own SQLite store unpickles what it reads
    with json_request_cache() if resume_cache is not None else contextlib.nullcontext():
        results = simple_evaluate(model=lm, tasks=[task_obj], task_manager=task_manager,
                                  num_fewshot=num_fewshot, limit=limit,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed,
                                  use_cache=None if resume_cache is None else str(resume_cache))
    (name, raw), = results["results"].items()
    metrics = {key.replace(",none", ""): value for key, value in raw.items()
               if key.endswith(",none") and isinstance(value, (int, float))}
    metric = headline_metric(metrics)
    source = "local" if (data_dir is not None and task in LOCAL_TASKS) else "lm-eval registry"
    record = {
        "task": task,
        "lm_eval_task": name,
        "source": source,
        "data_file": str(local_data_file(task, data_dir).resolve()) if source == "local" else None,
        "metric": metric,
        "value": metrics[metric],
        "stderr": metrics.get(f"{metric}_stderr"),
        "metrics": metrics,
        "n_samples": results.get("n-samples", {}).get(name),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "task_version": results.get("versions", {}).get(name),
        "lm_eval_version": version,
        "seed": seed,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "device_map": placement,
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("%s (%s): %s = %.4f +- %.4f on %s items", task, source, metric, record["value"],
             record["stderr"] or float("nan"), record["n_samples"])
    return record
