"""Recovery tuning (recover.py) on a tiny random llama with a byte-level tokenizer."""

import csv
import re
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flattengpt.recover import (RECIPE, RecoveryDataError, RecoveryError, RecoveryInterrupted, alpaca_prompt,
                                check_recovery_data, load_recovery_data, recover, recovery_options)

from .models_for_tests import SAMPLE_TEXT, make_model_with_tokenizer

# 480 tokens of SAMPLE_TEXT: 15 windows of 32 tokens
TINY = dict(cutoff_len=32, batch_size=4, micro_batch_size=2, learning_rate=1e-2, val_fraction=0.0,
            eval_every=0, save_every=0, log_every=1000, dropout=0.0)

RECORDS = [
    {"instruction": "Say the first line.", "input": "", "output": "It was the best of times."},
    {"instruction": "Continue.", "input": "it was the worst", "output": "of times, it was the age of wisdom."},
    {"instruction": "Name the season.", "output": "the season of Light"},
    {"instruction": "Repeat it.", "input": "the spring of hope", "output": "the spring of hope"},
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_with_tokenizer(tmp_path_factory.mktemp("recover"), "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _weights(out_dir):
    return load_file(str(out_dir / "model.safetensors"))


def test_options_are_validated_naming_the_option():
    assert recovery_options()["rank"] == 8 and RECIPE["target_modules"][-1] == "down_proj"
    assert recovery_options({"target_modules": "q_proj, v_proj"})["target_modules"] == ["q_proj", "v_proj"]
    for bad, name in [({"rank": 0}, "rank"), ({"schedule": "step"}, "schedule"), ({"loss_on": "x"}, "loss_on"),
                      ({"micro_batch_size": 3}, "micro_batch_size"), ({"val_fraction": 1.0}, "val_fraction"),
                      ({"max_steps": 0}, "max_steps"), ({"learning_rate": -1}, "learning_rate"),
                      ({"full_finetune": "yes"}, "full_finetune"), ({"ranks": 4}, "ranks"),
                      ({"target_modules": []}, "target_modules")]:
        with pytest.raises(RecoveryError, match=name):
            recovery_options(bad)


def test_loss_goes_down_and_merged_model_loads_without_peft(model_dir, text_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    lines = []
    record = recover(model_dir, text_file, out, options={**TINY, "max_steps": 12, "val_fraction": 0.2,
                                                         "eval_every": 4, "schedule": "cosine"},
                     log=lines.append)
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert len(rows) == 12 and [int(r["step"]) for r in rows] == list(range(1, 13))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < min(losses[:6]), losses  # 12 windows, 4 epochs
    assert [r["step"] for r in rows if r["val_loss"]] == ["4", "8", "12"]
    assert (out / "curve.png").stat().st_size > 0
    saved = json.loads((out / "recovery.json").read_text())
    assert saved["data"]["n_train"] == 12 and saved["data"]["n_val"] == 3 and saved["steps"]["total"] == 12
    assert saved["options"]["rank"] == 8 and saved["options"]["dtype"] == "float32"
    assert saved["provenance"]["inputs"]["model_fingerprint"] == record["model"]["fingerprint"]
    assert saved["peak_rss_mib"] > 0 and any("left" in line for line in lines)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not any("lora" in name for name in _weights(out))

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = _tokenizer(model_dir)(SAMPLE_TEXT[:120], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = peft_model(ids).logits, merged(ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert (expected - got).abs().max() < 1e-5
    assert (untrained - got).abs().max() > 1e-2  # the adapter did something


def test_kill_and_resume_equals_an_uninterrupted_run(model_dir, text_file, tmp_path):
    options = {**TINY, "max_steps": 6, "save_every": 3, "dropout": 0.05}  # dropout: the RNG state matters
    whole = tmp_path / "whole"
    recover(model_dir, text_file, whole, options=options, log=None)

    state, out, lines = tmp_path / "state", tmp_path / "resumed", []
    with pytest.raises(RecoveryInterrupted):
        recover(model_dir, text_file, out, options=options, state_dir=state, log=lines.append, stop_after_steps=4)
    assert not out.exists() and [p.name for p in state.iterdir()] == ["step-00000003"]
    assert all(p.suffix in (".safetensors", ".json") for p in (state / "step-00000003").iterdir())  # no pickle

    other = tmp_path / "other-state"
    shutil.copytree(state, other)  # a state made with other options is thrown away
    with pytest.raises(RecoveryInterrupted):
        recover(model_dir, text_file, tmp_path / "x", options={**options, "seed": 1}, state_dir=other,
                log=lines.append, stop_after_steps=1)
    assert any("discarding" in line for line in lines)

    record = recover(model_dir, text_file, out, options=options, state_dir=state, log=lines.append)
    assert record["steps"]["resumed_from"] == 3 and any("resuming at step 3" in line for line in lines)
    assert not state.exists()
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = list(csv.DictReader(open(whole / "curve.csv")))
    rows_b = list(csv.DictReader(open(out / "curve.csv")))
    assert rows_a == rows_b


def test_a_checkpoint_rebuilt_with_other_weights_of_the_same_shapes_does_not_resume(model_dir, text_file, tmp_path):
    """The resume key covers the weights' content: shapes alone (Checkpoint.fingerprint) would resume an
    adapter trained on the old weights after a compress rerun with, say, another lambda."""
    from flattengpt.checkpoint import Checkpoint
    from flattengpt.integrity import write_manifest
    from flattengpt.recover import weights_digest
    from safetensors.torch import save_file

    options = {**TINY, "max_steps": 4, "save_every": 2}
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(model_dir, rebuilt)
    tensors = load_file(str(rebuilt / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("down_proj.weight"))
    tensors[name] = tensors[name] + 0.01  # same shapes, dtypes and file size: other weights
    save_file(tensors, str(rebuilt / "model.safetensors"), metadata={"format": "pt"})
    assert Checkpoint(rebuilt).fingerprint() == Checkpoint(model_dir).fingerprint()
    assert weights_digest(rebuilt) != weights_digest(model_dir)

    state, lines = tmp_path / "state", []
    with pytest.raises(RecoveryInterrupted):
        recover(model_dir, text_file, tmp_path / "a", options=options, state_dir=state, log=None, stop_after_steps=3)
    record = recover(rebuilt, text_file, tmp_path / "b", options=options, state_dir=state, log=lines.append)
    assert record["steps"]["resumed_from"] == 0 and any("discarding" in line for line in lines)
    assert record["model"]["weights_sha256"] == weights_digest(rebuilt)

    # a workflow checkpoint's manifest gives the same digest without reading the weights again
    write_manifest(rebuilt, "compress")
    assert weights_digest(rebuilt) == record["model"]["weights_sha256"]


def test_micro_batching_does_not_change_the_step(model_dir, text_file, tmp_path):
    base = _weights_of(model_dir)
    results = []
    for micro in (2, 1):
        out = tmp_path / f"micro{micro}"
        recover(model_dir, text_file, out, options={**TINY, "max_steps": 1, "micro_batch_size": micro}, log=None)
        results.append(_weights(out))
    moved = 0.0
    for name in results[0]:
        # Adam's first step is about lr * sign(gradient), so rounding noise in near-zero gradients
        # shows up at ~1e-6 while the step itself moves weights by ~1e-2
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=2e-5)
        moved = max(moved, float((results[0][name] - base[name]).abs().max()))
    assert moved > 1e-3  # one step moved the merged weights


def _weights_of(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_full_finetune_and_alpaca_data(model_dir, tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "out"
    record = recover(model_dir, path, out, options={**TINY, "cutoff_len": 200, "max_steps": 2,
                                                    "full_finetune": True}, log=None)
    assert record["method"] == "full_finetune" and not (out / "adapter").exists()
    assert record["data"]["template"] == "alpaca" and record["data"]["n_records"] == 4
    assert record["trainable_parameters"] == sum(t.numel() for t in _weights_of(model_dir).values())


def test_response_only_masking(model_dir, tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    tokenizer = _tokenizer(model_dir)
    data = load_recovery_data(path, tokenizer, {"cutoff_len": 256, "batch_size": 4, "val_fraction": 0.0})
    assert len(data.train) == 4 and data.info["template"] == "alpaca"
    for record, (ids, labels) in zip(RECORDS, data.train):
        n_prompt = next(i for i, label in enumerate(labels) if label != -100)
        assert tokenizer.decode(ids[:n_prompt]) == alpaca_prompt(record)
        assert all(label == -100 for label in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(labels[n_prompt:]) == record["output"] + tokenizer.eos_token
    assert "### Input:\nit was the worst\n\n### Response:\n" in alpaca_prompt(RECORDS[1])
    assert "### Input:" not in alpaca_prompt(RECORDS[0]) and "### Input:" not in alpaca_prompt(RECORDS[2])

    everything = load_recovery_data(path, tokenizer, {"cutoff_len": 256, "batch_size": 4, "val_fraction": 0.0,
                                                      "loss_on": "all"})
    assert all(labels == ids for ids, labels in everything.train)
    # 130 tokens: the no-input prompts fit and their responses are cut; the prompts with input fill
    # the window, leaving nothing to learn, and are dropped
    short = load_recovery_data(path, tokenizer, {"cutoff_len": 130, "batch_size": 1, "micro_batch_size": 1,
                                                 "val_fraction": 0.0})
    assert max(len(ids) for ids, _ in short.train) == 130 and short.info["truncated"] >= 1
    prompts = [len(tokenizer(alpaca_prompt(r))["input_ids"]) for r in RECORDS]
    assert short.info["dropped_no_target"] == sum(n >= 129 for n in prompts) >= 1
    assert len(short.train) == 4 - short.info["dropped_no_target"] >= 1

    text = load_recovery_data({"text": SAMPLE_TEXT}, tokenizer, {"cutoff_len": 32, "batch_size": 4,
                                                                 "val_fraction": 0.2})
    assert (len(text.train), len(text.val)) == (12, 3)
    assert all(len(ids) == 32 and labels == ids for ids, labels in text.train + text.val)


@pytest.mark.parametrize("content, message", [
    ([{"output": "x"}], r"record 0 \(0-based\): missing field 'instruction'"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"record 1 \(0-based\): missing field 'output'"),
    ([{"instruction": "a", "output": "b"}, ["a", "b"]], r"record 1 \(0-based\): expected an object"),
    ([{"instruction": "a", "output": 3}], r"record 0 \(0-based\): field 'output' must be a string"),
    ([], "no records"),
    ("", "empty"),
    ([{"instruction": "a", "output": "b"}] * 3, "fewer than one batch"),
])
def test_bad_data_is_refused_before_any_model_is_loaded(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    options = {"batch_size": 4, "micro_batch_size": 2, "val_fraction": 0.0}
    with pytest.raises(RecoveryDataError, match=message) as err:
        recover(tmp_path / "no-such-model", path, tmp_path / "out", options=options, log=None)
    assert str(path) in str(err.value)
    with pytest.raises(RecoveryDataError, match=message):
        check_recovery_data(path, "alpaca", options)
    assert not (tmp_path / "out").exists()


def test_empty_text_and_jsonl_files_are_refused(tmp_path):
    for name, content in [("empty.txt", "  \n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(RecoveryDataError, match=str(path)):
            recover(tmp_path / "no-such-model", path, tmp_path / "out", log=None)


def test_the_schema_defaults_of_a_recovery_setting_are_the_recipe():
    import yaml

    from flattengpt.config import RECOVERY_KEYS
    from flattengpt.recover import RECIPE

    from .models_for_tests import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    properties = schema["definitions"]["recovery"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if k not in RECOVERY_KEYS}
    assert defaults == RECIPE


def _workflow_config(**recovery):
    return {"models": {"m": {}, "n": {}}, "calibration": {"c": {}}, "targets": {"t1": {}, "t2": {}},
            "methods": {"a": {}, "b": {}}, "evaluation": {"dense": True},
            "recovery": {"heal": {"data": {"source": "embedded", "name": "shakespeare-calibration"}, **recovery}}}


def test_which_models_a_recovery_setting_tunes():
    from flattengpt.recover import recovered_sources

    every = [("heal", model, f"c/{target}/{method}") for model in "mn" for target in ("t1", "t2") for method in "ab"]
    assert recovered_sources(_workflow_config()) == every  # methods and targets null: all of them
    assert recovered_sources(_workflow_config(methods=["b"], targets=["t2"])) == [("heal", "m", "c/t2/b"),
                                                                                   ("heal", "n", "c/t2/b")]
    assert recovered_sources(_workflow_config(dense=True, methods=[])) == [("heal", "m", "dense"),
                                                                           ("heal", "n", "dense")]
    config = _workflow_config(dense=True, methods=["a"], targets=["t1"])
    config["runs"] = [{"model": "n", "calibration": "c", "target": "t1"}, {"model": "n", "calibration": "c",
                                                                          "target": "t2"}]
    assert recovered_sources(config) == [("heal", "n", "dense"), ("heal", "n", "c/t1/a")]  # only the runs' models
    assert recovered_sources({**config, "recovery": {}}) == []


@pytest.mark.parametrize("recovery, evaluation_dense, message", [
    ({"targets": ["t9"]}, True, r"recovery.heal.targets: \['t9'\] are not defined under targets"),
    ({"methods": ["z"]}, True, r"recovery.heal.methods: \['z'\] are not defined under methods"),
    ({"dense": True}, False, "recovery.heal.dense: true compares .* evaluation.dense: false"),
    ({"methods": []}, True, "recovery.heal: recovers no model"),
    ({"targets": [], "methods": ["a"]}, True, "recovery.heal: recovers no model"),
    ({"rank": 0}, True, "recovery.heal: recovery option rank must be a positive integer"),
])
def test_recovery_settings_are_checked_at_config_time(recovery, evaluation_dense, message):
    from flattengpt.config import _check_recovery

    config = _workflow_config(**recovery)
    config["evaluation"]["dense"] = evaluation_dense
    errors = []
    _check_recovery(config, errors)
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    for fine in ({"dense": True, "methods": []}, {"methods": ["a"], "targets": ["t1"]}, {}):
        errors = []
        _check_recovery(_workflow_config(**fine), errors)
        assert errors == [], fine


def test_recover_stage_tunes_the_dense_model_on_device_auto(model_dir, tmp_path):
    """The workflow's path: compute.device auto (its default) and no checkpoint input (rule recover_dense)."""
    from flattengpt.provenance import write_json
    from flattengpt.stages import _evaluated, recover_stage

    model_json = tmp_path / "model.json"
    write_json(model_json, {"path": str(model_dir), "fingerprint": "f" * 64})
    settings = {"data": {"source": "embedded", "name": "shakespeare-calibration"}, **TINY, "max_steps": 1,
                "val_fraction": 0.0}
    out = tmp_path / "dense+heal" / "model"
    record = recover_stage(model_json, None, settings, {"device": "auto", "dtype": "float32", "batch_size": 8},
                           tmp_path / "state", out, {"rule": "recover_dense"})
    assert record["options"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert record["steps"]["total"] == 1 and record["model"]["path"] == str(model_dir)
    assert record["provenance"]["inputs"]["source"] == "dense" and record["provenance"]["rule"] == "recover_dense"
    assert not (out / "compression.json").exists() and (out / "recovery.json").is_file()
    path, inputs = _evaluated(model_json, out)  # what the evaluation stages read
    assert path == str(out) and inputs["model"] == "recovered dense"


# ----------------------------------------------------------------------------- hub data

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache, records, repo="yahma/alpaca-cleaned", file="alpaca_data_cleaned.json"):
    """A Hugging Face hub cache holding one dataset file, laid out as huggingface_hub writes it."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(HUB_COMMIT)
    (snapshot / file).write_text(json.dumps(records))
    return snapshot / file


def _offline(cache, code):
    """Run `code` with the hub offline and `cache` as its cache (huggingface_hub reads both at import)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_hub_alpaca_is_read_through_the_hugging_face_cache_by_the_recover_stage(model_dir, tmp_path):
    """`data: {source: hub, name: alpaca}` on an air-gapped node: the cached yahma/alpaca-cleaned file."""
    cached = _hub_cache(tmp_path / "hub", RECORDS * 2)
    code = f"""
import json, torch
torch.set_num_threads(1)
from flattengpt.provenance import write_json
from flattengpt.stages import recover_stage
write_json({str(tmp_path / 'model.json')!r}, {{"path": {str(model_dir)!r}, "fingerprint": "f" * 64}})
settings = {{"data": {{"source": "hub", "name": "alpaca"}}, **{TINY!r}, "cutoff_len": 400, "max_steps": 1, "val_fraction": 0.0}}
record = recover_stage({str(tmp_path / 'model.json')!r}, None, settings, {{"device": "cpu"}}, {str(tmp_path / 'state')!r},
                       {str(tmp_path / 'out')!r}, {{"rule": "recover_dense"}})
print(json.dumps({{"data": record["data"], "inputs": record["provenance"]["inputs"]["data"]}}))
"""
    result = _offline(tmp_path / "hub", code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["data"]["kind"] == "alpaca" and out["data"]["n_records"] == 8 and out["data"]["n_train"] == 8
    assert out["data"]["file"] == str(cached) and out["inputs"]["repo"] == "yahma/alpaca-cleaned"
    assert out["inputs"]["source"] == "hub" and out["inputs"]["file"] == "alpaca_data_cleaned.json"

    # not cached and offline: the job's error names the repository and the way out
    result = _offline(tmp_path / "empty-hub", "from flattengpt.recover import hub_data_file\n"
                      "hub_data_file({'source': 'hub', 'repo': 'org/data', 'file': 'd.jsonl'})")
    assert result.returncode != 0 and "hub recovery data org/data/d.jsonl: cannot be fetched" in result.stderr
    assert "source: local" in result.stderr


def test_hub_recovery_data_is_checked_at_config_time(tmp_path):
    from flattengpt.config import _check_recovery

    for data, message in [({"source": "hub", "name": "dolly"}, "unknown hub recovery data 'dolly'; known: alpaca"),
                          ({"source": "hub", "repo": "org/data"}, "needs a name .* or repo and file")]:
        config = _workflow_config()
        config["recovery"]["heal"]["data"] = data
        errors = []
        _check_recovery(config, errors)
        assert len(errors) == 1 and re.search(message, errors[0]) and errors[0].startswith("recovery.heal.data"), errors

    # a copy already in the cache is checked like a local file, naming the record; none cached: left to the job
    bad = [*RECORDS, {"instruction": "no output"}]
    _hub_cache(tmp_path / "hub", bad)
    code = ("from flattengpt.config import _check_recovery\n"
            f"config = {_workflow_config()!r}\n"
            "config['recovery']['heal']['data'] = {'source': 'hub', 'name': 'alpaca'}\n"
            "errors = []\n_check_recovery(config, errors)\nprint(errors)\n")
    result = _offline(tmp_path / "hub", code)
    assert result.returncode == 0, result.stderr
    assert "record 4 (0-based): missing field 'output'" in result.stdout
    result = _offline(tmp_path / "empty-hub", code)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
