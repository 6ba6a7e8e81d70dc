"""Bad inputs refused at config time (before any job), each naming the field and the file (issue 15).

Every case builds a config around one mistake and asserts the exact field and file named in the
message; none of them loads a model (the embedded model is sized from its recorded config).
"""

import json

import pytest

from flattengpt.config import ConfigError, validate_config
from flattengpt.data import local_text_problems, read_records

from .models_for_tests import REPO, make_model

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TEXT = "It was the best of times, it was the worst of times.\n\n" * 400  # 21 600 bytes


def config_with(calibration=None, target=None, model=None):
    return {"models": {"m": model or {"source": "embedded", "name": "smollm2-135m-instruct"}},
            "calibration": {"c": calibration or {"source": "embedded", "name": "shakespeare-calibration"}},
            "targets": {"t": target or {"remove_blocks": 2}}}


def refused(config) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(config, SCHEMA)
    return str(caught.value)


def text_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return str(path)


# ----------------------------------------------------------------------------- plan files

PLAN_CASES = {
    "yaml syntax": ("groups: [[0, 1], [2\n", "not valid YAML/JSON"),
    "no groups": ("blocks: [1, 2]\n", "expected a mapping with a `groups` list"),
    "overlap": ("groups: [[1, 2], [2, 3]]\n", "2"),
    "not contiguous": ("groups: [[1, 3]]\n", "[1, 3]"),
    "out of range": ("groups: [[28, 29, 30]]\n", "30"),
    "not integers": ("groups: [[1, two]]\n", "not a non-empty list of block indices"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_a_bad_plan_file_is_refused_at_config_time_with_the_target_and_file_named(tmp_path, case):
    content, expected = PLAN_CASES[case]
    path = text_file(tmp_path, "plan.yaml", content)
    message = refused(config_with(target={"plan_file": path}))
    assert "targets.t.plan_file (model 'm', 30 blocks)" in message and path in message
    assert expected in message


def test_a_good_plan_file_passes(tmp_path):
    path = text_file(tmp_path, "plan.yaml", "groups: [[3, 4], [9, 10]]\n")
    validate_config(config_with(target={"plan_file": path}), SCHEMA)


# ----------------------------------------------------------------------------- text files


def test_an_empty_calibration_file_is_refused(tmp_path):
    path = text_file(tmp_path, "empty.txt", "")
    message = refused(config_with({"source": "local", "path": path}))
    assert f"calibration.c.path: {path} is empty" in message


def test_text_too_short_for_n_samples_x_seq_len_is_refused_by_a_size_bound(tmp_path):
    path = text_file(tmp_path, "short.txt", TEXT)
    message = refused(config_with({"source": "local", "path": path, "n_samples": 128, "seq_len": 2048}))
    assert f"calibration.c.path: {path} is too short" in message and "262144" in message
    validate_config(config_with({"source": "local", "path": path, "n_samples": 4, "seq_len": 256}), SCHEMA)


def test_a_malformed_jsonl_line_is_named_by_its_line_number(tmp_path):
    lines = [json.dumps({"text": TEXT})] * 3 + ['{"text": "unterminated'] + [json.dumps({"text": "x"})]
    path = text_file(tmp_path, "data.jsonl", "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    message = refused(config_with({"source": "local", "path": path, "n_samples": 2, "seq_len": 16}))
    assert f"calibration.c.path: {path}, line 5: not a JSON record" in message  # the blank line counts


def test_malformed_json_and_records_without_the_fields_are_named(tmp_path):
    path = text_file(tmp_path, "data.json", '[{"instruction": "a"},\n {"instruction": "b",}]')
    assert f"{path}, line 2" in refused(config_with({"source": "local", "path": path}))
    path = text_file(tmp_path, "records.json", json.dumps([{"instruction": TEXT}, {"output": "y"}]))
    message = refused(config_with({"source": "local", "path": path, "fields": ["instruction", "input"],
                                   "n_samples": 2, "seq_len": 16}))
    assert f"{path}: record 1 has none of the fields ['instruction', 'input']" in message


def test_all_problems_are_reported_at_once(tmp_path):
    config = config_with({"source": "local", "path": text_file(tmp_path, "e.txt", "")},
                         {"plan_file": text_file(tmp_path, "p.yaml", "groups: [[0, 40]]\n")})
    message = refused(config)
    assert "calibration.c.path" in message and "targets.t.plan_file" in message


def test_the_run_time_reader_names_the_same_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2"):
        read_records(path)
    assert local_text_problems(path, ["text"]) and "line 2" in local_text_problems(path, ["text"])[0]


def test_a_local_model_directory_plan_file_is_checked_against_its_own_depth(tmp_path):
    model = make_model(tmp_path, "llama", num_layers=4)
    path = text_file(tmp_path, "plan.yaml", "groups: [[2, 3, 4]]\n")
    message = refused(config_with(model={"source": "local", "path": str(model)}, target={"plan_file": path}))
    assert "targets.t.plan_file (model 'm', 4 blocks)" in message


# ----------------------------------------------------------------------------- names and devices


@pytest.mark.parametrize("section", ["models", "calibration", "targets"])
def test_a_name_that_cannot_be_a_path_component_is_refused_with_a_suggestion(section):
    config = config_with()
    config[section] = {"my run/v2": next(iter(config[section].values()))}
    message = refused(config)
    assert f"{section}: 'my run/v2' cannot be a path component" in message and "'my-run-v2'" in message


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CUDA", "cuda:x"])
def test_an_unknown_device_is_refused_naming_the_field(device):
    config = config_with()
    config["compute"] = {"device": device}
    assert "compute.device" in refused(config)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_known_devices_pass(device):
    config = config_with()
    config["compute"] = {"device": device}
    validate_config(config, SCHEMA)


def test_cuda_without_a_visible_gpu_warns_at_submission_and_fails_on_the_node_naming_the_field():
    import torch

    from flattengpt.blockwise import resolve_device
    from flattengpt.config import device_warning

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "compute.device 'cuda'" in device_warning({"compute": {"device": "cuda"}})
    assert device_warning({"compute": {"device": "auto"}}) is None
    with pytest.raises(ValueError, match=r"compute.device 'cuda:1': no CUDA device is visible"):
        resolve_device("cuda:1")


# ----------------------------------------------------------------------------- model directories


def _no_weights(model):
    (model / "model.safetensors").unlink()


def _bin_only(model):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")


def _cut_in_half(model):
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


def _no_tokenizer(model):
    (model / "tokenizer.json").unlink()


def _missing_shard(model):
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


MODEL_DIR_CASES = {
    "no weights": (_no_weights, "has no safetensors weights"),
    "only pytorch_model.bin": (_bin_only, "(found pytorch_model.bin)"),
    "shard cut in half": (_cut_in_half, "model.safetensors is"),
    "no tokenizer": (_no_tokenizer, "has no tokenizer"),
    "a shard of the index missing": (_missing_shard, "1 of the 2 weight shards"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DIR_CASES))
def test_a_broken_local_model_directory_is_refused_at_config_time_naming_the_field(tmp_path, case):
    from .models_for_tests import make_model_with_tokenizer

    model = make_model_with_tokenizer(tmp_path, "llama")
    damage, expected = MODEL_DIR_CASES[case]
    damage(model)
    message = refused(config_with(model={"source": "local", "path": str(model)}))
    assert f"models.m.path: {model}" in message and expected in message


def test_a_local_model_whose_config_json_does_not_parse_is_refused_naming_it(tmp_path):
    from .models_for_tests import make_model_with_tokenizer

    model = make_model_with_tokenizer(tmp_path, "llama")
    (model / "config.json").write_text('{"model_type": "llama",')
    message = refused(config_with(model={"source": "local", "path": str(model)}))
    assert f"models.m.path: {model / 'config.json'} is not valid JSON" in message


def test_a_dry_run_sizes_a_model_from_config_json_alone_and_warns_what_a_run_refuses(tmp_path):
    """`snakemake -n` before the download (the README's sizing): config.json is enough; the same
    directory is refused by a real run, and a directory without config.json by both."""
    from .models_for_tests import make_model_with_tokenizer

    model = make_model_with_tokenizer(tmp_path, "llama")
    for name in ("model.safetensors", "tokenizer.json"):
        (model / name).unlink()
    config = config_with(model={"source": "local", "path": str(model)})
    warnings = []
    validate_config(json.loads(json.dumps(config)), SCHEMA, dry_run=True, warnings=warnings)
    assert len(warnings) == 1 and warnings[0].startswith(f"models.m.path: {model}")
    assert "has no safetensors weights" in warnings[0] and "a real run refuses this" in warnings[0]
    assert "has no safetensors weights" in refused(json.loads(json.dumps(config)))
    (model / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        validate_config(config, SCHEMA, dry_run=True, warnings=[])


@pytest.mark.parametrize("argv, expected", [
    (["snakemake", "-n"], True), (["snakemake", "--dry-run", "--cores", "2"], True),
    (["snakemake", "-np", "--profile", "slurm"], True), (["snakemake", "--cores", "2"], False),
    (["snakemake", "-c2", "-p"], False), (["snakemake", "--configfile", "n.yaml"], False)])
def test_dry_run_is_read_from_the_command_line(argv, expected):
    from flattengpt.integrity import dry_run

    assert dry_run(argv) is expected
