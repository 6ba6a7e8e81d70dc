# Config checks, path layout and parameter lookups shared by every rule.
from pathlib import Path

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


def all_outputs():
    outputs = []
    for run in runs(config):
        wc = dict(model=run["model"], calib=run["calibration"], target=run["target"])
        outputs += expand("results/{model}/{calib}/{target}/plan.json", **wc)
        outputs += expand("results/{model}/{calib}/{target}/{method}/model", method=config["methods"], **wc)
        outputs += expand("results/{model}/{calib}/similarity/{file}", file=SIMILARITY_FILES, **wc)
    return outputs


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


def plan_file_input(wildcards):
    spec = target_spec(wildcards)
    return [spec["plan_file"]] if spec.get("plan_file") else []


def method_params(wildcards):
    """The method's settings; only those it uses, so that e.g. lambda never reruns `drop`."""
    spec = config["methods"][wildcards.method]
    if spec["method"] != "flattengpt":
        return {"method": spec["method"]}
    return dict(spec)


def compute_params(wildcards):
    """Options that change computed numbers (not threads, which do not)."""
    compute = config["compute"]
    return {key: compute[key] for key in ("device", "dtype", "batch_size")}
