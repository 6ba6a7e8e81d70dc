"""Config validation: the schema fills defaults, the semantic checks name the field and the fix."""

import importlib.util

import pytest
import yaml

from flattengpt.adapters import SUPPORTED, UnsupportedArchitectureError, check_supported, get_adapter
from flattengpt.config import ConfigError, check_config, max_removable, runs, validate_config

from .models_for_tests import REPO, make_model_with_tokenizer, tiny_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def minimal_config():
    return {"models": {"m": {"source": "embedded", "name": "smollm2-135m-instruct"}},
            "calibration": {"c": {"source": "embedded", "name": "shakespeare-calibration"}},
            "targets": {"t": {"remove_blocks": 2}}}


def test_default_config_is_valid():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    validate_config(config, SCHEMA)
    assert len(runs(config)) == len(config["models"]) * len(config["calibration"]) * len(config["targets"])


def test_schema_fills_defaults():
    config = validate_config(minimal_config(), SCHEMA)
    assert config["compute"] == {"device": "auto", "dtype": "float32", "batch_size": 8, "threads": 2}
    assert config["calibration"]["c"] == {"source": "embedded", "name": "shakespeare-calibration", "fields": ["text"],
                                          "split": "train", "n_samples": 32, "seq_len": 256, "seed": 0}
    assert config["targets"]["t"]["max_group_size"] is None and config["targets"]["t"]["protect_first"] is False
    assert config["activations"]["max_tokens"] == 32768 and config["similarity"]["cka_max_tokens"] == 2048


def test_zero_shot_limit_per_task():
    config = minimal_config()
    config["evaluation"] = {"zero_shot": {"tasks": ["piqa"], "limit": {"piqa": 100}}}
    if importlib.util.find_spec("lm_eval") is not None:  # tasks need lm-eval installed
        assert validate_config(config, SCHEMA)["evaluation"]["zero_shot"]["limit"] == {"piqa": 100}
    config = minimal_config()
    config["evaluation"] = {"zero_shot": {"tasks": ["piqa"], "limit": {"hellaswag": 100}}}
    with pytest.raises(ConfigError, match=r"evaluation.zero_shot.limit: \['hellaswag'\] not in"):
        validate_config(config, SCHEMA)
    config["evaluation"] = {"zero_shot": {"tasks": ["piqa"], "limit": {"piqa": -1}}}
    with pytest.raises(ConfigError, match=r"evaluation.zero_shot.limit"):
        validate_config(config, SCHEMA)


def test_hub_texts_keep_their_own_fields():
    """ptb's records have `sentence`, not `text`: the file default must not reach hub datasets."""
    config = minimal_config()
    config["calibration"] = {"ptb": {"source": "hub", "name": "ptb"},
                             "file": {"source": "local", "path": str(REPO / "config.yaml"), "n_samples": 4,
                                      "seq_len": 64}}
    validate_config(config, SCHEMA)
    assert "fields" not in config["calibration"]["ptb"]
    assert config["calibration"]["file"]["fields"] == ["text"]


@pytest.mark.parametrize("bad, message", [
    ({"models": {"m": {"source": "ftp"}}}, "models.m.source: 'ftp' is not one of ['embedded', 'local', 'hub']"),
    ({"targets": {"t": {"ratio": 1.5}}}, "targets.t.ratio: 1.5 is greater than or equal to the maximum of 1"),
    ({"targets": {"t": {"ratio": 0}}}, "targets.t.ratio: 0 is less than or equal to the minimum of 0"),
    ({"targets": {"t": {"remove_blocks": 0}}}, "targets.t.remove_blocks: 0 is less than the minimum of 1"),
    ({"targets": {"t": {"remove_blocks": 2, "ratio": 0.2}}}, "targets.t: give exactly one of remove_blocks, ratio, plan_file"),
    ({"targets": {"t": {"remove_block": 2}}}, "targets.t: Additional properties are not allowed ('remove_block' was unexpected)"),
    ({"calibration": {"c": {"source": "embedded", "name": "x", "n_samples": 0}}}, "calibration.c.n_samples: 0 is less"),
])
def test_schema_errors_name_the_field(bad, message):
    config = {**minimal_config(), **bad}
    with pytest.raises(ConfigError) as info:
        validate_config(config, SCHEMA)
    assert any(e.startswith(message) for e in info.value.errors), info.value.errors


def test_semantic_errors_name_field_and_fix(tmp_path):
    model = make_model_with_tokenizer(tmp_path, "llama")  # 4 blocks
    config = {
        "models": {"small": {"source": "local", "path": str(model)},
                   "gone": {"source": "local", "path": str(tmp_path / "missing")},
                   "mystery": {"source": "embedded", "name": "gpt-17"}},
        "calibration": {"c": {"source": "local", "path": str(tmp_path / "nope.txt")},
                        "h": {"source": "hub", "name": "pile"}},
        "targets": {"big": {"remove_blocks": 4}, "capped": {"remove_blocks": 3, "max_group_size": 2},
                    "file": {"plan_file": str(tmp_path / "plan.yaml")}},
        "runs": [{"model": "small", "calibration": "c", "target": t} for t in ("big", "capped", "file")]
        + [{"model": "small", "calibration": "c", "target": "undefined"}],
    }
    with pytest.raises(ConfigError) as info:
        check_config(config)
    errors = info.value.errors
    text = str(info.value)
    assert "models.gone.path" in text and "does not exist" in text
    assert "models.mystery.name" in text and "smollm2-135m-instruct" in text
    assert "calibration.c.path" in text and "calibration.h.name" in text
    assert "targets.big.remove_blocks: 4 blocks cannot be removed from model 'small' (4 blocks; at most 3" in text
    assert "targets.capped.remove_blocks" in text and "at most 2" in text
    assert "targets.file.plan_file" in text
    assert "runs: target 'undefined'" in text
    assert len(errors) == 8


def test_runs_may_name_the_methods_of_each_combination():
    config = minimal_config()
    config["calibration"]["d"] = dict(config["calibration"]["c"])
    config["methods"] = {"a": {"method": "drop"}, "b": {"method": "shortgpt"}}
    config["runs"] = [{"model": "m", "calibration": "c", "target": "t"},
                      {"model": "m", "calibration": "d", "target": "t", "methods": ["b"]}]
    config = validate_config(config, SCHEMA)
    assert [run["methods"] for run in runs(config)] == [["a", "b"], ["b"]]
    config["runs"][1]["methods"] = ["b", "nope"]
    with pytest.raises(ConfigError) as info:
        check_config(config, dry_run=True)
    assert "runs: method 'nope' (of m/d/t) is not defined under methods" in str(info.value)
    config["runs"][1]["methods"] = []
    with pytest.raises(Exception, match="methods"):
        validate_config(config, SCHEMA)


def test_max_removable():
    assert max_removable(30, None, False, False) == 29
    assert max_removable(30, 2, False, False) == 15
    assert max_removable(30, 2, True, True) == 14
    assert max_removable(5, 3, True, False) == 2


@pytest.mark.parametrize("model_type, reason", [
    ("qwen3", "q_norm"), ("gemma2", "post-sublayer norms"), ("gemma", "1 + weight"), ("bert", "no adapter"),
])
def test_unsupported_architectures_are_named(model_type, reason):
    with pytest.raises(UnsupportedArchitectureError) as info:
        check_supported({"model_type": model_type, "architectures": ["X"]})
    message = str(info.value)
    assert model_type in message and reason in message
    for name in SUPPORTED:
        assert name in message


def test_unsupported_local_model_fails_config_check(tmp_path):
    (tmp_path / "qwen3").mkdir()
    (tmp_path / "qwen3" / "config.json").write_text('{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}')
    config = {"models": {"q": {"source": "local", "path": str(tmp_path / "qwen3")}},
              "calibration": {"c": {"source": "embedded", "name": "shakespeare-calibration"}},
              "targets": {"t": {"remove_blocks": 1}}}
    with pytest.raises(ConfigError, match=r"models\.q: model_type 'qwen3' \(Qwen3ForCausalLM\) is not supported"):
        check_config(config)


@pytest.mark.parametrize("arch, qkv_bias", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_adapter_shapes_and_shallower_config(arch, qkv_bias):
    adapter = get_adapter(tiny_config(arch, num_layers=6))
    shape = adapter.shape
    assert (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (64, 4, 2, 16)
    assert shape.qkv_bias == qkv_bias and shape.kv_group_size == 2
    shallow = adapter.shallower_config([0, 1, 3, 5])
    assert shallow.num_hidden_layers == 4
    if getattr(adapter.config, "layer_types", None):
        assert len(shallow.layer_types) == 4
    assert adapter.config.num_hidden_layers == 6, "the original config is not modified"
