"""Loading through a device map (evaluation.device_map): the same numbers as the plain path, and a record.

On a CPU-only machine the device map is the trivial one (everything on cpu), so these tests check
the plumbing and that nothing changes: logits, greedy generations and lm-eval scores must be
identical to the plain path. Spreading over several GPUs is not exercised here.
"""

import json
import re

import pytest
import torch
import yaml

from flattengpt import inference
from flattengpt.inference import device_map_summary, load_causal_lm, normalize_max_memory, placement_kwargs

from .models_for_tests import REPO, make_model, make_model_with_tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_model_with_tokenizer(tmp_path_factory.mktemp("inference"), "llama")


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids.to(inference.input_device(model))).logits


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential"])
def test_device_map_on_cpu_gives_the_plain_logits(tiny_llama, device_map, one_thread):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = load_causal_lm(tiny_llama, device="cpu")
    mapped = load_causal_lm(tiny_llama, device="cpu", device_map=device_map, max_memory={"cpu": "4GiB"})
    assert torch.equal(_logits(plain, ids), _logits(mapped, ids))
    summary = device_map_summary(mapped, device_map, {"cpu": "4GiB"})
    assert summary == {"requested": device_map, "max_memory": {"cpu": "4GiB"}, "devices": ["cpu"],
                       "layers_per_device": {"cpu": 4}, "input_device": "cpu", "output_device": "cpu",
                       "dispatched": False}
    json.dumps(summary)  # goes into JSON records as it is


def test_speed_load_through_a_device_map(tmp_path, one_thread):
    """speed._load (tied embeddings here: qwen2) loads the same model through either path."""
    from flattengpt.speed import _load

    path = make_model(tmp_path, "qwen2")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    plain = _load(path, torch.device("cpu"), torch.float32)
    mapped = _load(path, torch.device("cpu"), torch.float32, device_map="auto")
    assert torch.equal(_logits(plain, ids), _logits(mapped, ids))
    assert device_map_summary(mapped, "auto")["layers_per_device"] == {"cpu": 4}
    inference.synchronize(mapped)  # nothing to wait for on the CPU, and no error


def test_summary_of_a_spread_model_counts_layers_per_device(tiny_llama):
    """The summary reads hf_device_map when accelerate dispatched the model (faked here: CPU only)."""
    model = load_causal_lm(tiny_llama, device="cpu")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                           "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": "cpu"}
    summary = device_map_summary(model, "auto", {0: "1GiB", "cuda:1": "1GiB"})
    assert summary["devices"] == ["cuda:0", "cuda:1", "cpu"]
    assert summary["layers_per_device"] == {"cuda:0": 2, "cuda:1": 2}
    assert summary["output_device"] == "cpu" and summary["dispatched"]
    assert summary["max_memory"] == {"cuda:0": "1GiB", "cuda:1": "1GiB"}


def test_generations_through_a_device_map_are_the_plain_ones(tiny_llama, tmp_path, one_thread):
    from flattengpt.provenance import read_json, write_json
    from flattengpt.speed import sample_generations
    from flattengpt.stages import generation_stage

    prompts = ["It was the best of times", "the age of"]
    plain = sample_generations(tiny_llama, prompts, max_new_tokens=6)
    assert plain == sample_generations(tiny_llama, prompts, max_new_tokens=6, device_map="auto")

    write_json(tmp_path / "model.json", {"path": str(tiny_llama), "fingerprint": "tiny"})
    options = {"prompts": prompts, "max_new_tokens": 6}
    generation_stage(tmp_path / "model.json", None, options, {"device": "cpu", "dtype": "float32"},
                     tmp_path / "plain.json", {})
    generation_stage(tmp_path / "model.json", None, options,
                     {"device": "cpu", "dtype": "float32", "device_map": "sequential"}, tmp_path / "mapped.json", {})
    plain_record, mapped_record = read_json(tmp_path / "plain.json"), read_json(tmp_path / "mapped.json")
    assert plain_record["outputs"] == mapped_record["outputs"] == plain
    assert plain_record["device_map"] is None
    assert mapped_record["device_map"]["requested"] == "sequential"
    assert mapped_record["device_map"]["layers_per_device"] == {"cpu": 4}


# ----------------------------------------------------------------------------- zero-shot


def _arc_rows(n: int) -> list[dict]:
    """Rows in the ai2_arc layout the shipped arc_easy config reads."""
    words = ["times", "wisdom", "belief", "Light", "hope", "despair"]
    return [{"id": str(i), "question": f"It was the age of {words[i % 6]}, it was the",
             "choices": {"text": [words[(i + j) % 6] for j in range(4)], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(n)]


def test_zero_shot_through_a_device_map_scores_as_the_plain_path(tiny_llama, tmp_path, one_thread):
    pytest.importorskip("lm_eval")
    from flattengpt.zero_shot import evaluate_task

    (tmp_path / "arc_easy_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _arc_rows(6)))
    common = dict(data_dir=tmp_path, limit=6, batch_size=4)
    plain = evaluate_task(tiny_llama, "arc_easy", **common)
    mapped = evaluate_task(tiny_llama, "arc_easy", device_map="auto", max_memory={"cpu": "4GiB"}, **common)
    assert plain["n_samples"]["effective"] == 6
    assert mapped["metrics"] == plain["metrics"]
    assert plain["device_map"] is None
    assert mapped["device_map"]["devices"] == ["cpu"] and mapped["device_map"]["layers_per_device"] == {"cpu": 4}
    assert mapped["device_map"]["max_memory"] == {"cpu": "4GiB"}


# ----------------------------------------------------------------------------- refused requests


def test_max_memory_without_a_device_map_is_refused():
    with pytest.raises(ValueError, match=r"evaluation\.max_memory is set but evaluation\.device_map is null"):
        placement_kwargs("cpu", None, {"cpu": "1GiB"})
    assert placement_kwargs("cpu") == {}


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match=r"evaluation\.device_map must be null or one of"):
        placement_kwargs("cpu", "everywhere")
    with pytest.raises(ValueError, match=r"evaluation\.max_memory names GPU\(s\) \[0\] but compute\.device is cpu"):
        placement_kwargs("cpu", "auto", {0: "10GiB", "cpu": "1GiB"})
    with pytest.raises(ValueError, match=r"evaluation\.max_memory: device 'gpu0'"):
        normalize_max_memory({"gpu0": "1GiB"})
    with pytest.raises(ValueError, match=r"evaluation\.max_memory\.cpu: 'lots' is not a positive size"):
        normalize_max_memory({"cpu": "lots"})
    with pytest.raises(ValueError, match="names device cuda:0 twice"):
        normalize_max_memory({0: "1GiB", "cuda:0": "1GiB"})
    assert normalize_max_memory({"0": 1024, "cuda:1": "2GiB", "cpu": "1GB"}) == {0: 1024, 1: "2GiB", "cpu": "1GB"}


def test_cpu_device_offers_accelerate_only_the_cpu():
    """compute.device cpu keeps the model on the CPU even where GPUs exist: only cpu gets memory."""
    kwargs = placement_kwargs("cpu", "auto")
    assert kwargs["device_map"] == "auto" and list(kwargs["max_memory"]) == ["cpu"]
    assert placement_kwargs("cpu", "balanced", {"cpu": "3GiB"})["max_memory"] == {"cpu": "3GiB"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of GPU indices")
def test_gpu_indices_beyond_the_visible_ones_are_refused(monkeypatch):
    import flattengpt.inference as module

    monkeypatch.setattr(module, "resolve_device", lambda name: torch.device(name))
    with pytest.raises(ValueError, match=r"names GPU\(s\) \[0, 1\] but only 0 GPU\(s\) are visible"):
        placement_kwargs("cuda", "auto", {0: "1GiB", 1: "1GiB"})


# ----------------------------------------------------------------------------- config and workflow


def test_schema_accepts_the_device_map_keys():
    from flattengpt.config import validate_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    plain = validate_config(json.loads(json.dumps(config)), schema)
    assert plain["evaluation"]["device_map"] is None and plain["evaluation"]["max_memory"] is None
    config["evaluation"] = {**config.get("evaluation", {}), "device_map": "auto",
                            "max_memory": {0: "70GiB", "cpu": "100GiB"}}
    validated = validate_config(config, schema)
    assert validated["evaluation"]["device_map"] == "auto"
    config["evaluation"]["device_map"] = "everywhere"
    with pytest.raises(ValueError, match=r"evaluation\.device_map"):
        validate_config(config, schema)


def _rule_functions(config):
    """eval_compute and zero_shot_compute from workflow/rules/common.smk, run against `config`."""
    source = (REPO / "workflow" / "rules" / "common.smk").read_text()
    namespace = {"config": config}
    for name in ("eval_compute", "zero_shot_compute"):
        match = re.search(rf"^def {name}\(.*?(?=^\S)", source, flags=re.S | re.M)
        exec(match.group(0), namespace)
    return namespace["eval_compute"], namespace["zero_shot_compute"]


def test_rule_params_pass_the_device_map_only_when_set():
    config = {"compute": {"device": "cuda", "dtype": "float32"},
              "evaluation": {"dtype": "bfloat16", "device_map": None, "max_memory": None,
                             "zero_shot": {"dtype": "float16"}}}
    eval_compute, zero_shot_compute = _rule_functions(config)
    assert eval_compute(None) == {"device": "cuda", "dtype": "bfloat16"}  # as before: no new params, no reruns
    config["evaluation"].update(device_map="balanced", max_memory={0: "70GiB"})
    assert eval_compute(None) == {"device": "cuda", "dtype": "bfloat16", "device_map": "balanced",
                                  "max_memory": {0: "70GiB"}}
    assert zero_shot_compute(None) == {"device": "cuda", "dtype": "float16", "device_map": "balanced",
                                       "max_memory": {0: "70GiB"}}


def test_speed_through_a_device_map_records_it(tmp_path, one_thread):
    from flattengpt.speed import measure_speed

    dense, small = make_model(tmp_path / "dense", "llama"), make_model(tmp_path / "small", "llama", num_layers=2)
    kwargs = dict(prompt_len=8, decode_tokens=2, warmup=0, repeats=1)
    plain = measure_speed({"dense": dense, "compressed": small}, **kwargs)
    mapped = measure_speed({"dense": dense, "compressed": small}, device_map="auto", max_memory={"cpu": "4GiB"},
                           **kwargs)
    assert plain["settings"]["device_map"] is None and plain["models"]["dense"]["device_map"] is None
    assert mapped["settings"]["device_map"] == "auto" and mapped["settings"]["max_memory"] == {"cpu": "4GiB"}
    assert mapped["models"]["dense"]["device_map"]["layers_per_device"] == {"cpu": 4}
    assert mapped["models"]["compressed"]["device_map"]["layers_per_device"] == {"cpu": 2}
    with pytest.raises(ValueError, match=r"evaluation\.max_memory is set but evaluation\.device_map is null"):
        measure_speed({"dense": dense}, max_memory={"cpu": "1GiB"}, **kwargs)
