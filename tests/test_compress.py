"""The compression driver end to end: reload with vanilla transformers, references, bad input, resume."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from flattengpt import compress, prune
from flattengpt.compress import CompressionError, compress_model
from flattengpt.methods import flattengpt as flattengpt_method
from flattengpt.prune import LAMBDA_GRID

from .models_for_tests import STORIES, make_model, make_model_with_tokenizer
from .test_flatten import grouped_reference_logits, load_reference, make_variant

PLAN = [[0], [1, 2], [3]]


def calibration(n=4, seq_len=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def all_tensors(model_dir):
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def capture_final_hidden(monkeypatch):
    """Keep the driver's in-memory final hidden states X_L of the calibration set."""
    captured = {}
    original = compress._calibration_nll

    def spy(runner, hidden, input_ids):
        captured["hidden"] = hidden.clone()
        return original(runner, hidden, input_ids)

    monkeypatch.setattr(compress, "_calibration_nll", spy)
    return captured


def assert_greedy_generation_uses_cache_consistently(model, prompt, new_tokens=10):
    cached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    assert cached.shape[1] == prompt.shape[1] + new_tokens
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch,options", [
    ("llama", {}),
    ("llama-mha", {"compensation_target": "original"}),
    ("mistral", {"attn_compensation": True}),
    ("qwen2", {"compensation_target": "original", "attn_compensation": True, "lambda_factor": 1.0}),
])
def test_end_to_end_reloads_with_vanilla_transformers(tmp_path, monkeypatch, arch, options):
    model_dir = make_model_with_tokenizer(tmp_path, arch)
    ids = calibration(vocab=320)
    captured = capture_final_hidden(monkeypatch)
    out = tmp_path / "out"
    record = compress_model(model_dir, PLAN, ids, out, batch_size=3, provenance={"rule": "test"}, **options)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    config, original = model.config, json.loads((model_dir / "config.json").read_text())
    assert config.num_hidden_layers == 3 and len(model.model.layers) == 3
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim"):
        assert getattr(config, key) == original[key], key
    if "layer_types" in original:
        assert config.layer_types == original["layer_types"][:3]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]

    # the model the driver propagated the calibration set through is the one it saved
    with torch.no_grad():
        logits = model(ids).logits
        in_memory = model.lm_head(model.model.norm(captured["hidden"]))
    torch.testing.assert_close(logits, in_memory, rtol=1e-5, atol=1e-5)
    assert_greedy_generation_uses_cache_consistently(model, ids[:2, :6])
    assert AutoTokenizer.from_pretrained(out)("it was").input_ids
    assert (out / "generation_config.json").is_file() and (out / "model.safetensors.index.json").is_file()

    saved = json.loads((out / "compression.json").read_text())
    assert saved == json.loads(json.dumps(record, default=str))
    assert saved["groups"] == PLAN and saved["method"] == "flattengpt" and saved["provenance"] == {"rule": "test"}
    assert saved["options"] == {"lambda_factor": options.get("lambda_factor", 10.0),
                                "compensation_target": options.get("compensation_target", "flattened"),
                                "attn_compensation": options.get("attn_compensation", False),
                                "head_scoring": "output_norm", "dtype": "float32", "device": "cpu",
                                "solve_device": "auto", "solve_dtype": "float64", "batch_size": 3,
                                "validation_fraction": 0.25, "validation_seed": 0,
                                "lambda_grid": list(LAMBDA_GRID), "selection_lambda_factor": 1.0,
                                "plan_criterion": "cosine"}
    assert [s["flattened"] for s in saved["group_stats"]] == [False, True, False]
    pair = saved["group_stats"][1]
    assert len(pair["heads"]["kept_query_heads"]) == original["num_attention_heads"]
    assert len(pair["heads"]["kept_kv_groups"]) == original["num_key_value_heads"]
    assert pair["mlp"]["kept_channels"] == 96 and sum(pair["mlp"]["kept_channels_per_block"].values()) == 96
    error = pair["mlp"]["error"]
    assert error["rel_error_compensated"] <= error["rel_error_plain"]
    assert ("error_vs_flattened" in pair["mlp"]) == (options.get("compensation_target") == "original")
    assert saved["calibration_nll"] > 0 and saved["peak_rss_mib"] > 0 and saved["resumed_from_group"] == 0
    assert len(saved["timings"]["group_seconds"]) == 3
    assert not list(tmp_path.glob(".out.*")), "no temporary directory is left behind"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-obias"])
def test_flatten_only_equals_the_sum_of_blocks_model(tmp_path, arch):
    model_dir = make_variant(tmp_path, arch)
    plan = [[0], [1, 2, 3]]
    out = tmp_path / "flat"
    record = compress_model(model_dir, plan, calibration(), out, method="flatten-only")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2 and model.config.head_dim == 16
    # Llama's config class wants the head count to divide hidden_size (64): 3 x 4 heads become 16
    heads = 16 if arch.startswith("llama") else 12
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (
        heads, heads // 2, 96 * 3)
    assert record["shape"]["output"]["num_heads"] == heads and record["shape"]["widest_group"]["num_heads"] == 12
    ids = calibration(n=2, seq_len=12, seed=1)
    with torch.no_grad():
        got = model(ids).logits
    expected = grouped_reference_logits(load_reference(model_dir), ids, plan)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_greedy_generation_uses_cache_consistently(model, ids[:1, :5])


def test_drop_equals_deleting_blocks(tmp_path):
    model_dir = make_model(tmp_path, "qwen2")
    out = tmp_path / "drop"
    compress_model(model_dir, PLAN, torch.zeros(0, dtype=torch.long), out, method="drop")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 3
    source, dropped = all_tensors(model_dir), all_tensors(out)
    for new, old in enumerate([0, 1, 3]):
        for name in [n for n in source if n.startswith(f"model.layers.{old}.")]:
            assert torch.equal(dropped[name.replace(f"layers.{old}.", f"layers.{new}.")], source[name])
    ids = calibration(n=2, seq_len=10, seed=2)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, grouped_reference_logits(load_reference(model_dir), ids, [[0], [1], [3]]),
                               rtol=1e-5, atol=1e-5)
    # the ablations fit nothing: a fit option given to them is a mistake, not silently ignored
    for method in ("drop", "flatten-only"):
        with pytest.raises(CompressionError, match=f"method {method}: unknown option.*lambda_factor.*allowed: none"):
            compress_model(model_dir, PLAN, calibration(), tmp_path / "bad", method=method, lambda_factor=1.0)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def plan_record(*layers, num_layers=4):
    """A plan.json record (format 2) of the given (op, blocks) layers."""
    return {"num_layers": num_layers, "layers": [{"op": op, "blocks": blocks} for op, blocks in layers]}


@pytest.mark.parametrize("plan,message", [
    # a partition (list of groups) is checked by the driver against the model's blocks
    ([[0], [1, 2]], r"does not match the model.*missing \[3\]"),
    ([[0, 1], [1, 2], [3]], r"does not match the model.*repeated \[1\]"),
    ([[0], [2, 1], [3]], r"does not match the model: its groups must partition blocks 0-3 in order.*"
                         r"plan \[\[0\], \[2, 1\], \[3\]\]"),
    ([[0], [1, 3], [2]], r"does not match the model: its groups must partition blocks 0-3 in order.*"
                         r"plan \[\[0\], \[1, 3\], \[2\]\]"),
    ([[0], [1, 2], [3, 4]], r"does not match the model: its groups must partition blocks 0-3 in order.*"
                            r"plan \[\[0\], \[1, 2\], \[3, 4\]\]"),
    ([[0], [], [1, 2, 3]], r"group 1 is empty"),
    ([], "no groups"),
    # a plan record is checked by Plan.validate, which names the layer
    (plan_record(("keep", [0]), ("flatten", [2, 1]), ("keep", [3])),
     r"layers\[1\] \(flatten \[2, 1\]\): not a non-empty run of consecutive blocks"),
    (plan_record(("keep", [0]), ("flatten", [1, 3]), ("keep", [2])),
     r"layers\[1\] \(flatten \[1, 3\]\): not a non-empty run of consecutive blocks"),
    (plan_record(("keep", [0]), ("flatten", [1, 2]), ("flatten", [3, 4])),
     r"layers\[2\] \(flatten \[3, 4\]\): the model has blocks 0-3 only"),
    (plan_record(("flatten", [0, 1]), ("flatten", [1, 2]), ("keep", [3])),
     r"layers\[1\] \(flatten \[1, 2\]\): overlaps or precedes the layer before it"),
    (plan_record(("keep", [0]), ("keep", [1, 2]), ("keep", [3])),
     r"layers\[1\] \(keep \[1, 2\]\): a kept layer has exactly one source block"),
    (plan_record(("keep", [0]), ("squash", [1, 2]), ("keep", [3])), r"layers\[1\] \(squash \[1, 2\]\): op 'squash'"),
    (plan_record(("keep", [0]), ("flatten", [1, 2]), ("keep", [3]), ("keep", [4]), num_layers=5),
     r"the plan is for a model of 5 blocks; this one has 4"),
    (plan_record(), "the plan has no layers"),
])
def test_bad_plans_raise_and_leave_nothing_behind(tmp_path, plan, message):
    model_dir = make_model(tmp_path, "llama")
    with pytest.raises(CompressionError, match=message):
        compress_model(model_dir, plan, calibration(), tmp_path / "out", state_dir=tmp_path / "state")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not (tmp_path / "state").exists(), "a bad plan is rejected before any work"


def test_non_finite_activations_and_failing_solves_name_the_layer(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model_dir = make_model(tmp_path, "llama")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressionError, match=r"layer 1 \(blocks 1-2\), flatten: non-finite activations"):
        compress_model(model_dir, PLAN, calibration(), tmp_path / "out", state_dir=tmp_path / "state")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    good = make_model(tmp_path / "good", "llama")

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    monkeypatch.setattr(prune, "cholesky_lower_", failing)
    with pytest.raises(CompressionError, match=r"layer 1 \(blocks 1-2\), flatten: linalg.cholesky"):
        compress_model(good, PLAN, calibration(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(CompressionError, match="compensation_target"):
        compress_model(good, PLAN, calibration(), tmp_path / "out", compensation_target="sequential")


@pytest.mark.parametrize("method", ["flattengpt", "flatten-only"])
def test_interrupted_run_resumes_to_identical_output(tmp_path, monkeypatch, method):
    model_dir = make_model(tmp_path, "llama", num_layers=5)
    plan, ids = [[0], [1, 2], [3], [4]], calibration()
    small = {"max_shard_bytes": 150_000, "method": method}  # several shards, some groups left pending at the stop
    reference = compress_model(model_dir, plan, ids, tmp_path / "ref", **small)

    if method == "flattengpt":  # the FlattenGPT math, called by FlattenGPT.build for every layer
        original = flattengpt_method.compress_group

        def interrupted(runner, group, *args, **kwargs):
            if group == [4]:
                raise KeyboardInterrupt("simulated kill in the last group")
            return original(runner, group, *args, **kwargs)

        monkeypatch.setattr(flattengpt_method, "compress_group", interrupted)
    else:
        original = flattengpt_method.FlattenOnly.build

        def interrupted(self, ctx, layer, hidden):
            if layer.blocks == [4]:
                raise KeyboardInterrupt("simulated kill in the last group")
            return original(self, ctx, layer, hidden)

        monkeypatch.setattr(flattengpt_method.FlattenOnly, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model_dir, plan, ids, tmp_path / "out", state_dir=tmp_path / "state", **small)
    assert not (tmp_path / "out").exists()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["next_group"] == 3 and state["shards"] and state["pending_files"]
    monkeypatch.undo()

    resumed = compress_model(model_dir, plan, ids, tmp_path / "out", state_dir=tmp_path / "state", **small)
    assert resumed["resumed_from_group"] == 3 and reference["resumed_from_group"] == 0
    def untimed(stats):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in stats]

    assert untimed(resumed["group_stats"]) == untimed(reference["group_stats"])
    assert not (tmp_path / "state").exists(), "the resume state is removed after success"
    expected, got = all_tensors(tmp_path / "ref"), all_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(expected)


def test_resume_state_of_other_options_is_discarded(tmp_path, monkeypatch):
    model_dir = make_model(tmp_path, "llama")
    ids = calibration()

    original = flattengpt_method.compress_group

    def interrupted(runner, group, *args, **kwargs):
        if group == [3]:
            raise KeyboardInterrupt
        return original(runner, group, *args, **kwargs)

    monkeypatch.setattr(flattengpt_method, "compress_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model_dir, PLAN, ids, tmp_path / "out", state_dir=tmp_path / "state", lambda_factor=10.0)
    monkeypatch.undo()
    record = compress_model(model_dir, PLAN, ids, tmp_path / "out", state_dir=tmp_path / "state", lambda_factor=1.0)
    fresh = compress_model(model_dir, PLAN, ids, tmp_path / "fresh", lambda_factor=1.0)
    assert record["resumed_from_group"] == 0
    got, expected = all_tensors(tmp_path / "out"), all_tensors(tmp_path / "fresh")
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_real_model_stories260k(tmp_path):
    """The real GQA model with tied embeddings: 5 blocks -> 3, reloads, generates, keeps its widths."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big red ball under a tree. She ran to get it and laughed with her mom. ") * 6
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: 4 * 48].view(4, 48)
    plan = [[0], [1, 2], [3, 4]]
    for method in ("flattengpt", "drop"):
        out = tmp_path / method
        options = {"compensation_target": "original"} if method == "flattengpt" else {}  # drop has no options
        record = compress_model(STORIES, plan, ids, out, method=method, batch_size=2, **options)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert model.config.num_hidden_layers == 3 and model.config.tie_word_embeddings
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (8, 4, 8)
        assert "lm_head.weight" not in all_tensors(out)
        with torch.no_grad():
            loss = float(model(ids, labels=ids).loss)
        assert math.isfinite(loss)
        assert_greedy_generation_uses_cache_consistently(model, ids[:1, :8])
        if method == "flattengpt":
            assert abs(loss - record["calibration_nll"]) < 1e-4
            for stats in record["group_stats"][1:]:
                assert stats["mlp"]["kept_channels"] == 172 and stats["mlp"]["of_channels"] == 344
                assert stats["mlp"]["error"]["rel_error_compensated"] < stats["mlp"]["error"]["rel_error_plain"]


def test_source_dtype_is_kept(tmp_path):
    model_dir = make_model(tmp_path, "llama")
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    messages = []
    compress_model(tmp_path / "bf16", PLAN, calibration(), tmp_path / "out", log=messages.append)
    assert {t.dtype for t in all_tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert any("layer 1 (blocks 1-2), flatten done" in m and "MLP" in m for m in messages)


def test_untouched_blocks_are_bit_exact_and_targets_are_formed_in_float32(tmp_path, monkeypatch):
    """float16 checkpoint, bfloat16 compute: blocks 0 and 3 are the stored bytes; y - h is not rounded to bfloat16."""
    model_dir = make_model(tmp_path, "llama")
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).save_pretrained(tmp_path / "fp16")
    targets = []
    original_add = prune.Gram.add

    def spy(self, features, target=None):
        if target is not None:
            targets.append(target.clone())
        return original_add(self, features, target)

    monkeypatch.setattr(prune.Gram, "add", spy)
    compress_model(tmp_path / "fp16", PLAN, calibration(), tmp_path / "out", dtype="bfloat16",
                   compensation_target="original")
    source, out = all_tensors(tmp_path / "fp16"), all_tensors(tmp_path / "out")
    for new, old in ((0, 0), (2, 3)):
        names = [n for n in source if n.startswith(f"model.layers.{old}.")]
        for name in names:
            got = out[name.replace(f"layers.{old}.", f"layers.{new}.")]
            assert got.dtype == torch.float16 and torch.equal(got, source[name]), name
    assert targets and all(t.dtype == torch.float32 for t in targets)
    # y - h of two bfloat16 tensors is exact in float32; taken in bfloat16 it would be rounded to bfloat16
    # everywhere (here about a quarter of the exact differences need more than bfloat16's 8 bits)
    values = torch.cat([t.flatten() for t in targets])
    assert (values.bfloat16().float() != values).float().mean() > 0.1


def test_solve_options_are_validated_recorded_and_agree_with_the_default(tmp_path):
    model_dir = make_model(tmp_path, "llama")
    ids = calibration()
    reference = compress_model(model_dir, PLAN, ids, tmp_path / "ref", lambda_factor=1.0)
    record = compress_model(model_dir, PLAN, ids, tmp_path / "out", lambda_factor=1.0, solve_device="host",
                            solve_dtype="float32")
    assert (record["options"]["solve_device"], record["options"]["solve_dtype"]) == ("host", "float32")
    pair, ref_pair = record["group_stats"][1], reference["group_stats"][1]
    solve = pair["mlp"]["solve"]
    assert solve["dtype"] == "float32" and ref_pair["mlp"]["solve"]["dtype"] == "float64"
    assert solve["condition_bound"] <= 1 + 192 / 1.0  # 1 + n / lambda_factor, n = 2 x 96 channels
    assert 0 < solve["forward_error_bound"] < 1e-3 and pair["heads"]["solve"]["dtype"] == "float32"
    assert pair["heads"]["kept_query_heads"] == ref_pair["heads"]["kept_query_heads"]
    got, expected = all_tensors(tmp_path / "out"), all_tensors(tmp_path / "ref")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)
    with pytest.raises(CompressionError, match="solve_dtype float32 needs lambda_factor > 0"):
        compress_model(model_dir, PLAN, ids, tmp_path / "bad", lambda_factor=0.0, solve_dtype="float32")
    with pytest.raises(CompressionError, match="solve_device 'gpu' is not one of auto, host"):
        compress_model(model_dir, PLAN, ids, tmp_path / "bad", solve_device="gpu")


def test_group_memory_formula_counts_one_gram_matrix_where_the_solve_runs():
    from flattengpt.adapters import BlockShape
    from flattengpt.methods.flattengpt import group_memory_bytes

    shape = BlockShape(4096, 32, 32, 128, 11008, False, False)  # LLaMA-2-7B
    common = dict(compute_dtype_bytes=2, batch_size=1, seq_len=2048, compensation_target="flattened")
    auto = group_memory_bytes(shape, 2, solve_device="auto", **common)
    host = group_memory_bytes(shape, 2, solve_device="host", **common)
    gram = 22016**2 * 8
    # one n^2 float64 plus n x hidden and I x hidden extras (at 7B width 0.7 n^2); the former code held 4 n^2
    assert gram < auto["device"] < 2 * gram
    assert host["host"] - auto["host"] > gram and host["device"] <= auto["device"]
    assert group_memory_bytes(shape, 2, solve_device="auto", lambda_factor=0.0, **common)["device"] > 3 * gram
    wider = group_memory_bytes(shape, 3, solve_device="auto", **common)["device"]
    assert wider > (9 / 4) * gram  # n = 3 I
    cpu = group_memory_bytes(shape, 2, solve_device="auto", device="cpu", **common)
    assert cpu["device"] == 0 and cpu["host"] > auto["host"] + gram
