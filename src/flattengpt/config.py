"""Checks of the workflow configuration that the JSON schema cannot express.

Run by the Snakefile right after schema validation, before any job starts: every problem is
reported at once, each naming the config field and the fix, and nothing here loads a model
(layer counts come from config.json files or the embedded-model registry).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
from pathlib import Path

import jsonschema
import yaml

from .adapters import UnsupportedArchitectureError, check_supported


class ConfigError(ValueError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def _with_defaults(validator_class):
    """A validator that fills in `default:` values while it validates (the jsonschema FAQ recipe).

    `x-no-default-when: {key: value}` next to a default skips it for objects with that key and value.
    `x-no-defaults-with: {key: [names]}` beside `properties` skips those names' defaults for objects
    that have `key` (a calibration `mix` takes no top-level text defaults).
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def applies(subschema: dict, instance: dict) -> bool:
        unless = subschema.get("x-no-default-when", {})
        return "default" in subschema and not (unless and all(instance.get(k) == v for k, v in unless.items()))

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            skipped = {name for key, names in schema.get("x-no-defaults-with", {}).items() if key in instance
                       for name in names}
            for name, subschema in properties.items():
                if applies(subschema, instance) and name not in instance and name not in skipped:
                    instance[name] = json.loads(json.dumps(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # the schema's pattern of names that become path components


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "config"
    if error.validator == "oneOf":
        keys = [k for option in error.validator_value for k in option.get("required", [])]
        return f"{where}: give exactly one of {', '.join(keys)}"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"{where}: {error.message}; allowed keys: {', '.join(allowed)}"
    if error.validator == "pattern" and error.validator_value == NAME_PATTERN:
        suggestion = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(error.instance)).strip("-.") or "name"
        return (f"{where}: {error.instance!r} cannot be a path component; use letters, digits, '_', '.' and '-', "
                f"starting with a letter or digit, e.g. {suggestion!r}")
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{where}: {error.message}" + (f" ({hint.strip()})" if hint else "")


def validate_config(config: dict, schema_path: str | Path, dry_run: bool = False,
                    warnings: list[str] | None = None) -> dict:
    """Fill schema defaults into `config` in place, then raise ConfigError listing every problem.
    `dry_run`: a plan of the jobs, which reads no weights, so a local model directory needs only its
    config.json (sizing a 70B run before the download); what a real run would refuse is appended to
    `warnings` instead."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError([_schema_message(e) for e in errors])
    check_config(config, dry_run=dry_run, warnings=warnings)
    return config


def _embedded_models() -> dict:
    from .models import EMBEDDED_MODELS

    return EMBEDDED_MODELS


def _embedded_corpora() -> tuple[str, ...]:
    from .data import EMBEDDED_TEXTS

    return tuple(EMBEDDED_TEXTS)


def _hub_datasets() -> tuple[str, ...]:
    from .data import HUB_TEXTS

    return tuple(HUB_TEXTS)


def model_config_json(spec: dict) -> dict | None:
    """config.json of a model without loading it, or None when it is not available locally yet."""
    source = spec.get("source")
    if source == "local":
        path = Path(spec["path"]) / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore the model's config.json") from err
    if source == "embedded":
        entry = _embedded_models().get(spec.get("name"), {})
        return entry.get("config")
    if source == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec["id"], "config.json", revision=spec.get("revision"))
        except Exception:
            return None
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    return None


def max_removable(num_layers: int, max_group_size: int | None, protect_first: bool, protect_last: bool) -> int:
    """Most blocks a plan can remove under the group-size cap and the protections."""
    free = num_layers - int(protect_first) - int(protect_last)
    if free <= 1:
        return 0
    groups = math.ceil(free / max_group_size) if max_group_size else 1
    return free - groups


def _check_model(name: str, spec: dict, errors: list[str], dry_run: bool = False,
                 warnings: list[str] | None = None) -> None:
    where = f"models.{name}"
    errors_before = len(errors)
    source = spec.get("source")
    if source == "embedded":
        known = _embedded_models()
        if spec.get("name") not in known:
            errors.append(f"{where}.name: {spec.get('name')!r} is not an embedded model; use one of {sorted(known)}")
    elif source == "local":
        path = spec.get("path")
        if not path:
            errors.append(f"{where}.path: missing; set it to a Hugging Face model directory")
        else:
            from .checkpoint import model_dir_problems

            path = Path(path).expanduser()
            problems = [f"{where}.path: {problem}" for problem in model_dir_problems(path)]
            if dry_run and problems and (path / "config.json").is_file():
                # a dry run reads config.json alone (shapes for the plan and the resources)
                if warnings is not None:
                    warnings.extend(f"{p} (a dry run needs only config.json; a real run refuses this)"
                                    for p in problems)
            else:
                errors.extend(problems)
    elif source == "hub":
        if not spec.get("id"):
            errors.append(f"{where}.id: missing; set it to a hub id such as meta-llama/Llama-2-7b-hf")
    else:
        errors.append(f"{where}.source: {source!r} is not a model source; use embedded, local or hub")
        return
    # the architecture is checked whenever config.json can be read, beside any problem with the weights
    try:
        config = model_config_json(spec) if len(errors) == errors_before or source == "local" else None
    except ValueError as err:
        errors.append(f"{where}.path: {err}")
        config = None
    if config is not None:
        try:
            check_supported(config)
        except UnsupportedArchitectureError as err:
            errors.append(f"{where}: {err}")


def _check_text(where: str, spec: dict, errors: list[str], min_tokens: int | None = None) -> None:
    source = spec.get("source")
    if source == "embedded":
        corpora = _embedded_corpora()
        if spec.get("name") not in corpora:
            errors.append(f"{where}.name: {spec.get('name')!r} is not an embedded corpus; use one of {list(corpora)}")
    elif source == "local":
        path = spec.get("path")
        if not path:
            errors.append(f"{where}.path: missing; set it to a text, JSON or JSONL file")
        elif not Path(path).expanduser().is_file():
            errors.append(f"{where}.path: {path} does not exist; give an existing text, JSON or JSONL file")
        else:
            from .data import local_text_problems

            errors.extend(f"{where}.path: {problem}" for problem in
                          local_text_problems(path, spec.get("fields"), min_tokens))
    elif source == "hub":
        if spec.get("name") not in _hub_datasets():
            errors.append(f"{where}.name: {spec.get('name')!r} is not a known hub dataset; use one of "
                          f"{list(_hub_datasets())} or a local file")
    else:
        errors.append(f"{where}.source: {source!r} is not a text source; use embedded, local or hub")


_TEXT_KEYS = ("source", "name", "path", "fields", "split")


def _check_calibration(name: str, spec: dict, errors: list[str]) -> None:
    where = f"calibration.{name}"
    n_samples, seq_len = spec.get("n_samples", 32), spec.get("seq_len", 256)
    if "mix" not in spec:
        _check_text(where, spec, errors, n_samples * seq_len)
        return
    beside = [key for key in _TEXT_KEYS if key in spec]
    if beside:
        errors.append(f"{where}: {', '.join(beside)} beside `mix`; give either one `source` or a `mix` list, and put "
                      "each text's source, name/path, fields and split in its mix item")
    mix = spec["mix"]
    if not isinstance(mix, list) or not mix:
        errors.append(f"{where}.mix: list at least one text, each a text spec with a proportion")
        return
    valid = True
    for i, item in enumerate(mix):
        item_where = f"{where}.mix[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{item_where}: expected a text spec with a proportion, got {item!r}")
            valid = False
            continue
        _check_text(item_where, item, errors)
        proportion = item.get("proportion")
        if isinstance(proportion, bool) or not isinstance(proportion, (int, float)) or not proportion > 0 \
                or not math.isfinite(proportion):
            errors.append(f"{item_where}.proportion: {proportion!r}; give a positive number (shares are normalised "
                          "by their sum)")
            valid = False
    n_samples = spec.get("n_samples", 32)
    if valid and isinstance(n_samples, int) and n_samples >= 1:
        from .data import mix_counts

        proportions = [item["proportion"] for item in mix]
        for i, count in enumerate(mix_counts(proportions, n_samples)):
            if count == 0:
                need = math.ceil(sum(proportions) / proportions[i])
                errors.append(f"{where}.mix[{i}].proportion: {proportions[i]} of n_samples={n_samples} rounds to 0 "
                              f"windows; raise {where}.n_samples to at least {need} or this proportion")


def _check_target(name: str, spec: dict, layer_counts: dict[str, int], errors: list[str]) -> None:
    where = f"targets.{name}"
    given = [key for key in ("remove_blocks", "ratio", "plan_file") if spec.get(key) is not None]
    if len(given) != 1:
        errors.append(f"{where}: give exactly one of remove_blocks, ratio or plan_file (got {given or 'none'})")
        return
    if "ratio" in given and not 0 < spec["ratio"] < 1:
        errors.append(f"{where}.ratio: {spec['ratio']} is outside (0, 1); give the fraction of all parameters to remove, "
                      "e.g. 0.2")
    if "plan_file" in given and not Path(spec["plan_file"]).is_file():
        errors.append(f"{where}.plan_file: {spec['plan_file']} does not exist")
    elif "plan_file" in given:  # syntax, groups, overlaps, contiguity and range, against every model it runs on
        from .plan import plan_from_file

        for model, num_layers in layer_counts.items():
            try:
                plan_from_file(spec["plan_file"], num_layers)
            except ValueError as err:
                errors.append(f"{where}.plan_file (model {model!r}, {num_layers} blocks): {err}")
    if "remove_blocks" in given:
        k = spec["remove_blocks"]
        for model, num_layers in layer_counts.items():
            limit = max_removable(num_layers, spec.get("max_group_size"), spec.get("protect_first", False),
                                  spec.get("protect_last", False))
            if not 1 <= k <= limit:
                errors.append(f"{where}.remove_blocks: {k} blocks cannot be removed from model {model!r} "
                              f"({num_layers} blocks; at most {limit} with max_group_size="
                              f"{spec.get('max_group_size')}, protect_first={spec.get('protect_first', False)}, "
                              f"protect_last={spec.get('protect_last', False)}); lower it")


def _check_evaluation(config: dict, errors: list[str]) -> None:
    if "dense" in config.get("calibration", {}):
        errors.append("calibration.dense: the name `dense` is reserved for the uncompressed model's results "
                      "(results/{model}/dense/); rename this calibration set")
    evaluation = config.get("evaluation", {})
    for name, spec in evaluation.get("perplexity", {}).get("corpora", {}).items():
        _check_text(f"evaluation.perplexity.corpora.{name}", spec, errors)
    zero_shot = evaluation.get("zero_shot", {})
    tasks = zero_shot.get("tasks", [])
    if len(set(tasks)) != len(tasks):
        errors.append(f"evaluation.zero_shot.tasks: {tasks} lists a task twice; list each once")
    batch_size = zero_shot.get("batch_size", 16)
    if isinstance(batch_size, str) and not batch_size.startswith("auto"):
        errors.append(f"evaluation.zero_shot.batch_size: {batch_size!r} is neither an integer nor 'auto'")
    if tasks and importlib.util.find_spec("lm_eval") is None:
        errors.append("evaluation.zero_shot.tasks: zero-shot evaluation needs lm-eval; "
                      "pip install lm-eval==0.4.13 (or empty the task list)")
    limit = zero_shot.get("limit")
    if isinstance(limit, dict) and set(limit) - set(tasks):
        errors.append(f"evaluation.zero_shot.limit: {sorted(set(limit) - set(tasks))} not in "
                      f"evaluation.zero_shot.tasks {tasks}; limit only tasks that are listed there")
    data_dir = zero_shot.get("data_dir")
    if tasks and data_dir is not None:
        from .zero_shot import LOCAL_TASKS

        for task in tasks:
            if task in LOCAL_TASKS and not (Path(data_dir) / LOCAL_TASKS[task][0]).is_file():
                errors.append(f"evaluation.zero_shot.data_dir: {Path(data_dir) / LOCAL_TASKS[task][0]} not found "
                              f"for task {task}; point data_dir at a folder laid out like "
                              "shared/data/tasks/lm_eval_jsonl, or set it to null to use the hub")


def runs(config: dict) -> list[dict]:
    """The (model, calibration, target) combinations this config asks for, each with its `methods`.

    An entry of `runs:` without `methods` (or with null) runs every method of `methods:`.
    """
    every = list(config.get("methods") or {})
    if config.get("runs"):
        return [{**run, "methods": every if run.get("methods") is None else list(run["methods"])}
                for run in config["runs"]]
    return [{"model": m, "calibration": c, "target": t, "methods": every}
            for m, c, t in itertools.product(config["models"], config["calibration"], config["targets"])]


def device_warning(config: dict) -> str | None:
    """compute.device cuda where this machine sees no GPU: fine if the jobs go to GPU nodes, not if they run here."""
    device = str(config.get("compute", {}).get("device", "auto"))
    if not device.startswith("cuda"):
        return None
    import torch

    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    if index < count:
        return None
    return (f"compute.device {device!r}: this machine sees {count} CUDA device(s). Jobs submitted to GPU nodes "
            "(--profile slurm) are fine; jobs run here will fail. For a local run set compute.device: auto or cpu")


def check_config(config: dict, dry_run: bool = False, warnings: list[str] | None = None) -> None:
    """Raise ConfigError listing every problem in a (schema-validated) config (`dry_run`: see validate_config)."""
    errors: list[str] = []
    for name, spec in config.get("models", {}).items():
        _check_model(name, spec, errors, dry_run, warnings)
    for name, spec in config.get("calibration", {}).items():
        _check_calibration(name, spec, errors)

    layer_counts: dict[str, dict[str, int]] = {}
    for run in runs(config):
        for key, section in (("model", "models"), ("calibration", "calibration"), ("target", "targets")):
            if run[key] not in config.get(section, {}):
                errors.append(f"runs: {key} {run[key]!r} is not defined under {section}; "
                              f"defined: {sorted(config.get(section, {}))}")
        for method in run["methods"]:
            if method not in config.get("methods", {}):
                errors.append(f"runs: method {method!r} (of {run['model']}/{run['calibration']}/{run['target']}) "
                              f"is not defined under methods; defined: {sorted(config.get('methods', {}))}")
        spec = config.get("models", {}).get(run["model"])
        try:
            model_config = model_config_json(spec) if spec else None
        except ValueError:  # reported with the model
            model_config = None
        if model_config and "num_hidden_layers" in model_config:
            layer_counts.setdefault(run["target"], {})[run["model"]] = model_config["num_hidden_layers"]
    for name, spec in config.get("targets", {}).items():
        _check_target(name, spec, layer_counts.get(name, {}), errors)
    _check_methods(config, layer_counts, errors)
    _check_recovery(config, errors)
    _check_evaluation(config, errors)
    if errors:
        raise ConfigError(errors)


FLATTENING_METHODS = ("flattengpt", "drop", "flatten-only")
RECOVERY_WHERE = ("methods", "targets", "dense")  # which models a recovery: entry applies to, not how
RECOVERY_KEYS = ("data", *RECOVERY_WHERE)  # the rest of a recovery: entry is recover.RECIPE's options


def _check_recovery(config: dict, errors: list[str]) -> None:
    """Every recovery setting: its options, its data (read and counted, no tokenizer), the methods and
    targets it names, and that it applies to at least one model."""
    from .recover import RecoveryError, check_recovery_data, hub_data_file, recovery_options

    for name, spec in (config.get("recovery") or {}).items():
        where = f"recovery.{name}"
        try:
            options = recovery_options({k: v for k, v in spec.items() if k not in RECOVERY_KEYS})
        except RecoveryError as err:
            errors.append(f"{where}: {err}")
            continue
        for key in ("methods", "targets"):
            unknown = sorted(set(spec.get(key) or []) - set(config.get(key, {})))
            if unknown:
                errors.append(f"{where}.{key}: {unknown} are not defined under {key}; defined: "
                              f"{sorted(config.get(key, {}))}")
        if spec.get("dense") and not config.get("evaluation", {}).get("dense", True):
            errors.append(f"{where}.dense: true compares the recovered dense model with the dense one, which "
                          "evaluation.dense: false leaves out; set evaluation.dense: true or dense: false")
        if not spec.get("dense") and (spec.get("methods") == [] or spec.get("targets") == []):
            errors.append(f"{where}: recovers no model (an empty methods or targets list and dense: false); "
                          "name some methods and targets, or set dense: true")
        data = spec["data"]
        if data["source"] == "embedded":
            if data.get("name") not in _embedded_corpora():
                errors.append(f"{where}.data.name: {data.get('name')!r} is not an embedded corpus; use one of "
                              f"{list(_embedded_corpora())}")
        elif data["source"] == "hub":
            try:  # a copy already in the Hugging Face cache is checked now; else the job fetches and checks it
                cached = hub_data_file(data, offline_cache_only=True)
                if cached is not None:
                    check_recovery_data(cached, data.get("kind", "auto"), options)
            except RecoveryError as err:
                errors.append(f"{where}.data: {err}")
        elif not data.get("path"):
            errors.append(f"{where}.data.path: missing; give an Alpaca .json/.jsonl file or a text file")
        elif not Path(data["path"]).expanduser().is_file():
            errors.append(f"{where}.data.path: {data['path']} does not exist")
        else:
            try:
                check_recovery_data(data["path"], data.get("kind", "auto"), options)
            except RecoveryError as err:
                errors.append(f"{where}.data: {err}")


def _check_methods(config: dict, layer_counts: dict[str, dict[str, int]], errors: list[str]) -> None:
    """Every method's options, and every (target, method) pair it will run: plan files, block counts."""
    from .methods import MethodError, get_method

    methods = {}
    for name, spec in config.get("methods", {}).items():
        try:
            methods[name] = get_method(spec)
        except MethodError as err:
            errors.append(f"methods.{name}: {err}")
    for target, spec in config.get("targets", {}).items():
        for name, method in methods.items():
            if spec.get("plan_file") and not method.reads_plan_file:
                errors.append(f"targets.{target}.plan_file: method {name!r} ({method.name}) chooses its own blocks; "
                              f"a plan file only replaces the flattening plan of {', '.join(FLATTENING_METHODS)}. "
                              "Give this target remove_blocks or ratio, or run that method on another target")
            k = spec.get("remove_blocks")
            if k is None or method.reads_plan_file:
                continue  # the flattening plan's limit is checked with the target; ratios once the model is known
            for model, num_layers in layer_counts.get(target, {}).items():
                try:
                    limit = method.max_removable(num_layers)
                except MethodError as err:  # options that do not fit this model (e.g. a window past its top)
                    errors.append(f"methods.{name} on model {model!r} ({num_layers} blocks): {err}")
                    continue
                if k > limit:
                    errors.append(f"targets.{target}.remove_blocks: {k} blocks cannot be removed from model {model!r} "
                                  f"({num_layers} blocks) by methods.{name} ({method.name}, at most {limit} with "
                                  "its options); lower it or relax the method's options")
