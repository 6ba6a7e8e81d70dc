"""LaCo and SLM: the merge rules, the trial similarities, the released control flows, the bisection, the driver."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from flattengpt.blockwise import BlockwiseModel
from flattengpt.compress import compress_model
from flattengpt.flatten import block_state, names
from flattengpt.methods import MethodError, SearchInputs, get_method
from flattengpt.methods import merging
from flattengpt.methods.base import BuildContext
from flattengpt.methods.laco import LaCo, laco_search
from flattengpt.methods.merging import (CurrentLayer, Trials, build_merged_block, merge_items, merge_tensors,
                                        source_model, window_weights)
from flattengpt.methods.slm import SLM, slm_search
from flattengpt.plan import Layer

from .models_for_tests import REPO, make_model

FAST = {"samples": 3, "sample_len": 16, "bisection_steps": 6}


def calibration(n=4, seq_len=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def block(tensors, index):
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def context(runner):
    return BuildContext(runner=runner, plan=None, batch_size=4, output_shape=runner.adapter.shape)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("merging"), "llama", seed=3, num_layers=8)


# ----------------------------------------------------------------------------- options


def test_options_match_the_schema():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    properties = schema["definitions"]["method_merging"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if k != "method"}
    for cls in (LaCo, SLM):
        assert cls.OPTIONS == defaults
        assert set(cls.CHOICE_OPTIONS) == set(cls.OPTIONS)
        assert cls.chooses_with == "model" and cls.fits is False
    with pytest.raises(MethodError, match="rule"):
        get_method({"method": "laco", "rule": "average"})
    with pytest.raises(MethodError, match="merge_layers"):
        get_method({"method": "laco", "merge_layers": 1})
    with pytest.raises(MethodError, match="lowest"):
        get_method({"method": "slm", "lowest": 5, "highest": 3})


# ----------------------------------------------------------------------------- the merge rules


def test_code_rule_keeps_the_top_projections_and_the_bottom_norms(tmp_path):
    model_dir = make_model(tmp_path, "qwen2", num_layers=6)  # qwen2: q/k/v biases
    runner = BlockwiseModel(model_dir)
    n = names(runner.adapter)
    weights = window_weights([{2: 1.0}, {3: 1.0}, {4: 1.0}], "code")
    assert weights == {4: 1.0}
    merged = merge_tensors(context(runner), Layer("merge", [2, 3, 4], weights=weights))
    tensors = checkpoint_tensors(model_dir)
    low, top = block(tensors, 2), block(tensors, 4)
    assert set(merged) == set(low)
    for role in merging.PROJECTIONS:
        assert torch.equal(merged[f"{n[role]}.weight"], top[f"{n[role]}.weight"])
    others = [name for name in low if not any(name == f"{n[r]}.weight" for r in merging.PROJECTIONS)]
    assert any(name.endswith(".bias") for name in others) and any("norm" in name for name in others)
    for name in others:  # norms and q/k/v biases of the lowest block
        assert torch.equal(merged[name], low[name]), name


def test_paper_rule_and_its_composition_match_the_formula(tmp_path):
    model_dir = make_model(tmp_path, "llama", num_layers=8)
    runner = BlockwiseModel(model_dir)
    n = names(runner.adapter)
    tensors = checkpoint_tensors(model_dir)
    theta = {b: {role: block(tensors, b)[f"{n[role]}.weight"].double() for role in merging.PROJECTIONS}
             for b in range(8)}

    def formula(items):  # theta_low + sum_k (theta_{low+k} - theta_low), item by item
        return {role: items[0][role] + sum(item[role] - items[0][role] for item in items[1:])
                for role in merging.PROJECTIONS}

    def check(layer: CurrentLayer, expected):
        built = merge_tensors(context(runner), Layer("merge", list(layer.blocks), weights=layer.weight_dict))
        for role in merging.PROJECTIONS:
            assert torch.allclose(built[f"{n[role]}.weight"].double(), expected[role], atol=1e-6), role

    flat = merge_items([CurrentLayer.source(b) for b in (4, 5, 6)], "paper")
    assert flat.weight_dict == {4: -1.0, 5: 1.0, 6: 1.0}
    check(flat, formula([theta[4], theta[5], theta[6]]))
    # LaCo's next window reaches into that merge from below: [2, 3, M(4-6)]
    composed = merge_items([CurrentLayer.source(2), CurrentLayer.source(3), flat], "paper")
    assert composed.blocks == (2, 3, 4, 5, 6)
    assert composed.weight_dict == {2: -1.0, 3: 1.0, 4: -1.0, 5: 1.0, 6: 1.0}
    theta_m = formula([theta[4], theta[5], theta[6]])
    check(composed, formula([theta[2], theta[3], theta_m]))
    # a merged layer at the bottom of a window is the base the differences are taken from
    on_top = merge_items([flat, CurrentLayer.source(7)], "paper")
    check(on_top, formula([theta_m, theta[7]]))
    # the code rule composes to the top item
    assert merge_items([CurrentLayer.source(2), flat], "code").weight_dict == flat.weight_dict
    # the trials' module (accumulated on the runner's device) holds the driver's tensors exactly
    module = build_merged_block(runner, composed.blocks, composed.weight_dict)
    built = merge_tensors(context(runner), Layer("merge", list(composed.blocks), weights=composed.weight_dict))
    for name, value in block_state(module).items():
        assert torch.equal(value, built[name]), name


# ----------------------------------------------------------------------------- similarities vs transformers


def hf_final_states(model, ids):
    with torch.no_grad():
        return torch.cat([model(ids[i:i + 1], output_hidden_states=True, use_cache=False).hidden_states[-1]
                          for i in range(ids.shape[0])])


def hf_merged(model_dir, current: list[CurrentLayer], tensors):
    """The model with every merged layer of `current` made by hand: weights replaced, the others deleted."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    n = None
    layers = []
    for layer in current:
        module = model.model.layers[layer.blocks[0]]
        if layer.merged:
            n = n or {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
            for role, name in n.items():
                value = sum(w * block(tensors, b)[f"{name}.weight"].double() for b, w in layer.weights)
                module.get_submodule(name).weight.data.copy_(value.float())
        layers.append(module)
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    for i, module in enumerate(layers):
        module.self_attn.layer_idx = i
    return model


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).mean())


def test_trial_similarities_equal_vanilla_transformers(llama8, one_thread):
    runner = BlockwiseModel(llama8)
    ids = calibration()[:3, :16]
    tensors = checkpoint_tensors(llama8)
    original = hf_final_states(AutoModelForCausalLM.from_pretrained(llama8, torch_dtype=torch.float32).eval(), ids)
    trials = Trials(runner, ids, "paper", batch_size=2)

    # a flat window 3..5, the paper formula computed here from the checkpoint
    s = trials.similarity((3, 5), source_model(8))
    flat = [CurrentLayer.source(b) for b in range(8)]
    flat[3:6] = [CurrentLayer((3, 4, 5), ((3, -1.0), (4, 1.0), (5, 1.0)))]
    assert s == pytest.approx(cosine(hf_final_states(hf_merged(llama8, flat, tensors), ids), original), abs=1e-5)
    assert trials.forwards == 8 + 1 + 2  # the cached stream, the merged block, blocks 6 and 7

    # a window below an earlier merge: the trial builds the merged layer above and keeps it resident
    current = source_model(8)
    current[5:8] = [merge_items(current[5:8], "paper")]
    s2 = trials.similarity((1, 2), current)
    current[1:3] = [merge_items(current[1:3], "paper")]
    assert s2 == pytest.approx(cosine(hf_final_states(hf_merged(llama8, current, tensors), ids), original), abs=1e-5)

    # [4, M(5-7)] has, by rule paper, M's weights with block 4's norms: not M's resident module
    current = source_model(8)
    current[5:8] = [merge_items(current[5:8], "paper")]  # built for the trial above
    s3 = trials.similarity((4, 5), current)
    current[4:6] = [merge_items(current[4:6], "paper")]
    assert current[4] == CurrentLayer((4, 5, 6, 7), ((5, -1.0), (6, 1.0), (7, 1.0)))
    assert s3 == pytest.approx(cosine(hf_final_states(hf_merged(llama8, current, tensors), ids), original), abs=1e-5)

    # repeated trials come from the memo
    forwards = trials.forwards
    assert trials.similarity((3, 5), source_model(8)) == s and trials.forwards == forwards and trials.hits == 1


def test_recorded_merge_similarities_equal_vanilla_transformers(llama8, one_thread):
    runner = BlockwiseModel(llama8)
    ids = calibration()
    plan = get_method({"method": "laco", "merge_layers": 3, "interval": 1, **FAST}).choose(
        3, search=SearchInputs(runner=runner, input_ids=ids, batch_size=2))
    sample = ids[:FAST["samples"], :FAST["sample_len"]]
    tensors = checkpoint_tensors(llama8)
    original = hf_final_states(AutoModelForCausalLM.from_pretrained(llama8, torch_dtype=torch.float32).eval(), sample)
    merges = [s for s in plan.steps if s["kind"] == "merge"]
    assert merges
    current = source_model(8)
    for merge in merges:  # each merge's similarity is that of the model right after it
        low, high = merge["window"]
        current[low:high + 1] = [merge_items(current[low:high + 1], "paper")]
        assert current[low].weight_dict == {int(b): w for b, w in merge["weights"].items()}
        model = hf_merged(llama8, current, tensors)
        assert merge["similarity"] == pytest.approx(cosine(hf_final_states(model, sample), original), abs=1e-5)


# ----------------------------------------------------------------------------- the released control flows


class Fake:
    """A hand-made similarity of the window's source span (first, last block); records the calls."""

    def __init__(self, table, default=0.0):
        self.table, self.default, self.calls = table, default, []

    def __call__(self, window, current):
        low, high = window
        span = (current[low].blocks[0], current[high].blocks[-1])
        self.calls.append(span)
        return self.table.get(span, self.default)


def spans(layers):
    return [(layer.blocks[0], layer.blocks[-1]) for layer in layers]


def test_laco_follows_the_released_algorithm():
    # L = 8, C = 3, I = 2, lowest 1, highest 8, threshold 0.5; worked out by hand:
    #   lay 5: layers 5-7, s = 0.5: a tie, rejected (s > T) -> lay 4
    #   lay 4: layers 4-6, 0.9 accepted: [0 1 2 3 M(4-6) 7] -> lay 2
    #   lay 2: 2, 3, M -> blocks 2-6, 0.7 accepted (composed): [0 1 M(2-6) 7] -> lay 0 < lowest: stop
    fake = Fake({(5, 7): 0.5, (4, 6): 0.9, (2, 6): 0.7, (2, 3): 0.6})
    result = laco_search(8, fake, 0.5, merge_layers=3, interval=2, lowest=1, highest=8)
    assert fake.calls == [(5, 7), (4, 6), (2, 6)]
    assert [t["accepted"] for t in result.trials] == [False, True, True]
    assert [(m["span"], m["removes"], m["similarity"]) for m in result.merges] == [([4, 6], 2, 0.9), ([2, 6], 2, 0.7)]
    assert spans(result.layers) == [(0, 0), (1, 1), (2, 6), (7, 7)]
    assert result.layers[2].weight_dict == {2: -1.0, 3: 1.0, 4: -1.0, 5: 1.0, 6: 1.0}
    assert result.removed == 4

    # stopping at k = 3: after the first merge one block remains, so the window at lay 2 is cut to 2-3
    fake = Fake({(5, 7): 0.5, (4, 6): 0.9, (2, 6): 0.7, (2, 3): 0.6})
    result = laco_search(8, fake, 0.5, merge_layers=3, interval=2, lowest=1, highest=8, k=3)
    assert fake.calls == [(5, 7), (4, 6), (2, 3)]
    assert spans(result.layers) == [(0, 0), (1, 1), (2, 3), (4, 6), (7, 7)] and result.removed == 3

    # rejections slide the window down one layer at a time until lay < lowest
    fake = Fake({})
    result = laco_search(8, fake, 0.5, merge_layers=3, interval=2, lowest=1, highest=8)
    assert fake.calls == [(5, 7), (4, 6), (3, 5), (2, 4), (1, 3)] and result.removed == 0

    # the code rule: the merged layer is the top one's
    result = laco_search(8, Fake({(4, 6): 0.9}), 0.5, merge_layers=3, interval=2, lowest=1, highest=8, rule="code")
    assert result.layers[4].weight_dict == {6: 1.0}


def test_slm_follows_the_released_algorithm():
    # L = 8, highest 7 (high = 6), lowest 0, threshold 0.5; worked out by hand:
    #   (5,6) 0.9 grow; (4,6) 0.8 grow; (3,6) 0.5 tie, rejected -> merge 4-6 (its 0.8), high 3, low 2
    #   (2,3) 0.2 rejected, two layers -> slide: high 2, low 1
    #   (1,2) 0.7 grow; (0,2) 0.6 grow -> low -1: the loop ends; the accepted 0-2 is merged (departure)
    table = {(5, 6): 0.9, (4, 6): 0.8, (3, 6): 0.5, (2, 3): 0.2, (1, 2): 0.7, (0, 2): 0.6}
    fake = Fake(table)
    result = slm_search(8, fake, 0.5, lowest=0, highest=7)
    assert fake.calls == [(5, 6), (4, 6), (3, 6), (2, 3), (1, 2), (0, 2)]
    assert [(m["span"], m["similarity"]) for m in result.merges] == [([4, 6], 0.8), ([0, 2], 0.6)]
    assert spans(result.layers) == [(0, 2), (3, 3), (4, 6), (7, 7)] and result.removed == 4
    assert result.layers[2].weight_dict == {4: -1.0, 5: 1.0, 6: 1.0}

    # stopping at k = 3: the window 1-2 removes exactly the last block, so it is merged at once
    fake = Fake(table)
    result = slm_search(8, fake, 0.5, lowest=0, highest=7, k=3)
    assert fake.calls == [(5, 6), (4, 6), (3, 6), (2, 3), (1, 2)]
    assert spans(result.layers) == [(0, 0), (1, 2), (3, 3), (4, 6), (7, 7)] and result.removed == 3

    # k = 2 stops while the first window still grows
    fake = Fake(table)
    result = slm_search(8, fake, 0.5, lowest=0, highest=7, k=2)
    assert fake.calls == [(5, 6), (4, 6)] and spans(result.layers)[4] == (4, 6)

    # a window never reaches an earlier merge: after merging 4-6 the next window ends at 3
    fake = Fake({(5, 6): 0.9})
    result = slm_search(8, fake, 0.5, lowest=0, highest=7)
    assert fake.calls == [(5, 6), (4, 6), (3, 4), (2, 3), (1, 2), (0, 1)]
    assert spans(result.layers) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (7, 7)]


# ----------------------------------------------------------------------------- bisection, capacity, resume


@pytest.mark.parametrize("name", ["laco", "slm"])
def test_bisection_removes_exactly_k(llama8, one_thread, name):
    runner = BlockwiseModel(llama8)
    for k in (2, 4):
        plan = get_method({"method": name, **FAST}).choose(k, search=SearchInputs(runner=runner, input_ids=calibration()))
        plan.validate()
        json.dumps(plan.to_json())  # plan.json
        assert plan.remove_blocks == k and plan.method == name
        bisection = [s for s in plan.steps if s["kind"] == "bisection"]
        assert len(bisection) == FAST["bisection_steps"]
        hits = [s["threshold"] for s in bisection if s["removed"] == k]
        assert plan.options["threshold_found"] == max(hits, default=-1.0)
        assert all(0 <= s["removed"] <= k for s in bisection)
        # the largest threshold found: the bisection's upper end removes fewer
        misses = [s["threshold"] for s in bisection if s["removed"] != k]
        assert all(t > plan.options["threshold_found"] for t in misses)
        merges = [s for s in plan.steps if s["kind"] == "merge"]
        assert sum(m["removes"] for m in merges) == k
        assert all(m["similarity"] > plan.options["threshold_found"] for m in merges)
        assert plan.cost["memo_hits"] > 0 and plan.cost["block_forwards"] >= 8


def test_impossible_k_is_refused_before_any_forward(llama8, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("a block forward before the capacity check")

    monkeypatch.setattr(merging.ResidentBlocks, "forward", no_forward)
    search = SearchInputs(runner=BlockwiseModel(llama8), input_ids=calibration())
    # slm: windows over blocks 4..6 (they end below highest = 7) merge at most 3 blocks into 1: 2 removed
    method = get_method({"method": "slm", "lowest": 4, **FAST})
    assert method.max_removable(8) == 2
    with pytest.raises(MethodError, match=r"at most 2.*`lowest`"):
        method.choose(3, search=search)
    # laco: the first window starts at highest - merge_layers = 2, below lowest 3: nothing can merge
    with pytest.raises(MethodError, match=r"at most 0.*`lowest`.*`highest`"):
        get_method({"method": "laco", "lowest": 3, "highest": 6, **FAST}).choose(1, search=search)
    with pytest.raises(MethodError, match="highest 9"):
        get_method({"method": "laco", "highest": 9}).choose(1, search=search)


def test_numeric_threshold_that_misses_k_says_so(llama8, one_thread):
    search = SearchInputs(runner=BlockwiseModel(llama8), input_ids=calibration())
    with pytest.raises(MethodError, match=r"removed 0 of 2 blocks.*threshold: null"):
        get_method({"method": "slm", "threshold": 1.0, **FAST}).choose(2, search=search)
    plan = get_method({"method": "slm", "threshold": -1.0, **FAST}).choose(2, search=search)
    assert plan.remove_blocks == 2 and plan.options["threshold_found"] == -1.0


def test_search_resumes_after_an_interruption(llama8, one_thread, tmp_path, monkeypatch):
    runner = BlockwiseModel(llama8)
    options = {"method": "laco", **FAST}
    reference = get_method(options).choose(3, search=SearchInputs(runner=runner, input_ids=calibration()))

    calls = {"n": 0}
    original = LaCo.search

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the capacity check, then bisection steps 1-3, then stop
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    state_dir = tmp_path / "state"
    monkeypatch.setattr(LaCo, "search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        get_method(options).choose(3, search=SearchInputs(runner=runner, input_ids=calibration(), state_dir=state_dir))
    assert (state_dir / "state.json").is_file()
    monkeypatch.setattr(LaCo, "search", original)
    lines = []
    plan = get_method(options).choose(3, search=SearchInputs(runner=runner, input_ids=calibration(),
                                                             state_dir=state_dir, log=lines.append))
    assert any("resuming" in line for line in lines)
    assert [l.to_json() for l in plan.layers] == [l.to_json() for l in reference.layers]
    assert [s["threshold"] for s in plan.steps if s["kind"] == "bisection"] == \
        [s["threshold"] for s in reference.steps if s["kind"] == "bisection"]
    assert not (state_dir / "state.json").exists()


# ----------------------------------------------------------------------------- the driver


def test_driver_builds_the_plan(llama8, one_thread, tmp_path):
    runner = BlockwiseModel(llama8)
    ids = calibration()
    plan = get_method({"method": "laco", **FAST}).choose(3, search=SearchInputs(runner=runner, input_ids=ids))
    assert any(layer.op == "merge" for layer in plan.layers)
    out = tmp_path / "out"
    record = compress_model(llama8, plan, None, out, method="laco")
    assert record["num_layers"] == {"original": 8, "compressed": 5}
    sample = ids[:FAST["samples"], :FAST["sample_len"]]
    original = hf_final_states(AutoModelForCausalLM.from_pretrained(llama8, torch_dtype=torch.float32).eval(), sample)
    compressed = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert compressed.config.num_hidden_layers == 5
    last = [s for s in plan.steps if s["kind"] == "merge"][-1]
    assert cosine(hf_final_states(compressed, sample), original) == pytest.approx(last["similarity"], abs=1e-5)
    for layer in plan.layers:  # every merged layer's score is the similarity of the merge that made it
        if layer.op == "merge":
            assert not math.isnan(layer.score)
