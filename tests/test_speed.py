"""Speed and memory measurement: the shape and sanity of the record, not which model is faster.

Timings on a shared CI machine say nothing reliable about speedups; those belong in benchmarks.
"""

from __future__ import annotations

import math

import pytest
import torch

from flattengpt import speed
from flattengpt.speed import kv_cache_bytes_per_token, measure_speed, sample_generations

from .models_for_tests import STORIES, make_model, tiny_config

SMALL = dict(prompt_len=16, decode_tokens=4, warmup=1, repeats=2)
RECORD_FIELDS = {"model_dir", "num_layers", "parameters", "prefill_tokens_per_s", "prefill_tokens_per_s_runs",
                 "decode_ms_per_token", "decode_ms_per_token_runs", "kv_cache_bytes_per_token",
                 "peak_memory_mib", "memory_method"}


def test_kv_cache_bytes_per_token_with_gqa():
    config = tiny_config("llama")  # 4 layers, 2 key/value heads of width 16
    assert kv_cache_bytes_per_token(config, "float32") == 2 * 4 * 2 * 16 * 4
    assert kv_cache_bytes_per_token(config, torch.bfloat16) == 2 * 4 * 2 * 16 * 2


def test_kv_cache_head_dim_from_hidden_size():
    config = tiny_config("llama-mha")  # 4 key/value heads; without head_dim, 64 / 4 = 16 wide
    config.head_dim = None
    assert kv_cache_bytes_per_token(config, "float16") == 2 * 4 * 4 * 16 * 2


@pytest.fixture(scope="module")
def speed_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    dense = make_model(root / "dense", "llama")
    small = make_model(root / "small", "llama", num_layers=2)
    return measure_speed({"dense": dense, "compressed": small}, **SMALL)


def test_measure_speed_record(speed_result):
    settings = speed_result["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert {k: settings[k] for k in SMALL} == SMALL
    assert settings["batch_size"] == 1 and settings["torch_threads"] >= 1 and settings["torch_version"]
    assert settings["schedule"] == "interleaved"
    assert set(speed_result["models"]) == {"dense", "compressed"}
    for record in speed_result["models"].values():
        assert set(record) >= RECORD_FIELDS
        assert record["memory_method"] == "cpu_rss_increase"
        assert len(record["prefill_tokens_per_s_runs"]) == len(record["decode_ms_per_token_runs"]) == 2
        for value in [record["prefill_tokens_per_s"], record["decode_ms_per_token"],
                      *record["prefill_tokens_per_s_runs"], *record["decode_ms_per_token_runs"]]:
            assert math.isfinite(value) and value > 0
        assert math.isfinite(record["peak_memory_mib"]) and record["peak_memory_mib"] >= 0
    dense, small = speed_result["models"]["dense"], speed_result["models"]["compressed"]
    assert (dense["num_layers"], small["num_layers"]) == (4, 2)
    assert dense["parameters"] > small["parameters"] > 0
    assert dense["kv_cache_bytes_per_token"] == 2 * small["kv_cache_bytes_per_token"] == 2 * 4 * 2 * 16 * 4


def test_measure_speed_ratios(speed_result):
    ratios = speed_result["ratios"]
    assert set(ratios) == {"compressed"}
    assert ratios["compressed"]["ideal_speedup"] == 4 / 2
    for key in ("prefill_speedup", "decode_speedup"):
        assert math.isfinite(ratios["compressed"][key]) and ratios["compressed"][key] > 0


def test_no_ratios_without_dense(tmp_path):
    result = measure_speed({"only": make_model(tmp_path, "qwen2")}, prompt_len=8, decode_tokens=2, warmup=0,
                           repeats=1)
    assert "ratios" not in result
    assert len(result["models"]["only"]["decode_ms_per_token_runs"]) == 1


def test_rounds_rotate_the_model_order():
    assert list(speed._rotations(["a", "b", "c"], 4)) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                          ["a", "b", "c"]]
    assert list(speed._rotations(["a"], 2)) == [["a"], ["a"]]
    assert list(speed._rotations(["a", "b"], 0)) == []


@pytest.mark.parametrize("interleave", [True, False])
def test_schedule_of_timed_runs(tmp_path, monkeypatch, interleave):
    """Interleaved: both models loaded, runs alternate with the order rotated; sequential: one model at a time."""
    dense, small = make_model(tmp_path / "dense", "llama"), make_model(tmp_path / "small", "llama", num_layers=2)
    loaded, calls, real_load = [], [], speed._load

    def load(model_dir, device, dtype, **placement):
        model = real_load(model_dir, device, dtype, **placement)
        loaded.append(model_dir)
        return model

    def prefill(model, input_ids, now):
        calls.append(("prefill", model.config.num_hidden_layers, len(loaded)))
        return 0.5

    monkeypatch.setattr(speed, "_load", load)
    monkeypatch.setattr(speed, "_prefill_seconds", prefill)
    result = measure_speed({"dense": dense, "compressed": small}, prompt_len=8, decode_tokens=2, warmup=1,
                           repeats=2, interleave=interleave)
    assert result["settings"]["schedule"] == ("interleaved" if interleave else "sequential")
    # a discarded footprint pass of the first model (CPU), one per model (one prefill each), then timing
    footprint, timing = calls[:3], calls[3:]
    assert [c[1] for c in footprint] == [4, 4, 2]
    order = [c[1] for c in timing]
    if interleave:
        assert order == [4, 2, 4, 2, 2, 4]  # warm-up round, then two timed rounds in rotated order
        assert {c[2] for c in timing} == {5}  # both models were loaded before any timed run
    else:
        assert order == [4, 4, 4, 2, 2, 2]
        assert [c[2] for c in timing] == [4, 4, 4, 5, 5, 5]
    for record in result["models"].values():
        assert record["prefill_tokens_per_s_runs"] == [8 / 0.5, 8 / 0.5]
        assert len(record["decode_ms_per_token_runs"]) == 2


@pytest.mark.parametrize("kwargs, argument", [
    (dict(prompt_len=250, decode_tokens=10), "max_position_embeddings"),  # tiny models allow 256 positions
    (dict(repeats=0), "repeats"),
    (dict(prompt_len=0), "prompt_len"),
    (dict(decode_tokens=0), "decode_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(warmup=-1), "warmup"),
    (dict(dtype="float8"), "dtype"),
    (dict(interleave="yes"), "interleave"),
])
def test_bad_arguments_fail_before_loading(tmp_path, monkeypatch, kwargs, argument):
    from transformers import AutoModelForCausalLM

    model_dir = make_model(tmp_path, "llama")

    def no_loading(*args, **kw):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=argument):
        measure_speed({"dense": model_dir}, **kwargs)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match=r"model_dirs\['dense'\]"):
        measure_speed({"dense": tmp_path / "nowhere"})
    with pytest.raises(ValueError, match="model_dirs"):
        measure_speed({})


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_sample_generations_on_a_real_model():
    prompts = ["Once upon a time, there was a little girl", "The dog ran to the park and"]
    first = sample_generations(STORIES, prompts, max_new_tokens=12)
    assert first == sample_generations(STORIES, prompts, max_new_tokens=12), "greedy decoding is deterministic"
    assert [sample["prompt"] for sample in first] == prompts
    for sample in first:
        assert isinstance(sample["completion"], str) and sample["completion"].strip()
        assert 1 <= sample["n_new_tokens"] <= 12


def test_interrupted_measurement_resumes_with_the_remaining_rounds(tmp_path, monkeypatch):
    """Killed in the second timed decode round: the rerun reuses the memory pass and the finished rounds."""
    dense = make_model(tmp_path / "dense", "llama")
    small = make_model(tmp_path / "small", "llama", num_layers=2)
    dirs, options = {"dense": dense, "compressed": small}, {**SMALL, "repeats": 3}
    original, calls = speed._decode_seconds, []

    def killed(*args):
        calls.append(1)
        # 3 memory-pass decodes (one discarded), 2 warm-up, 2 in round 0, the first of round 1
        if len(calls) == 8:
            raise KeyboardInterrupt("simulated kill")
        return original(*args)

    monkeypatch.setattr(speed, "_decode_seconds", killed)
    with pytest.raises(KeyboardInterrupt):
        measure_speed(dirs, state_dir=tmp_path / "state", resume_key="k", **options)
    monkeypatch.setattr(speed, "_decode_seconds", original)
    assert (tmp_path / "state" / "state.json").is_file()

    other = measure_speed(dirs, state_dir=tmp_path / "other", resume_key="another checkpoint", **options)
    assert other["resume"] == {"memory_pass": [], "resumed": False,
                               "timed_runs": {n: {"prefill": 0, "decode": 0} for n in dirs}}
    resumed = measure_speed(dirs, state_dir=tmp_path / "state", resume_key="k", **options)
    assert not (tmp_path / "state").exists(), "the state is removed once the measurement is complete"
    assert resumed["resume"] == {"memory_pass": ["dense", "compressed"], "resumed": True,
                                 "timed_runs": {n: {"prefill": 3, "decode": 1} for n in dirs}}
    assert resumed.keys() == other.keys() and resumed["settings"] == other["settings"]
    for name in dirs:
        assert resumed["models"][name].keys() == other["models"][name].keys()
        assert len(resumed["models"][name]["decode_ms_per_token_runs"]) == 3
        assert len(resumed["models"][name]["prefill_tokens_per_s_runs"]) == 3
