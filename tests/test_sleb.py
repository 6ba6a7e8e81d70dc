"""SLEB: greedy removals against an independent brute force, protections, ties, resume, reload."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt.blockwise import BlockwiseModel
from flattengpt.compress import compress_model
from flattengpt.methods import MethodError, SearchInputs, get_method
from flattengpt.methods.sleb import SLEB

from .models_for_tests import make_model


def calibration(n=3, seq_len=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def search_inputs(model_dir, ids, **kwargs):
    return SearchInputs(runner=BlockwiseModel(model_dir), input_ids=ids, batch_size=2, **kwargs)


@torch.no_grad()
def hf_loss(model, layers, kept, ids):
    """Mean next-token NLL of the Hugging Face model restricted to blocks `kept`: no code shared with SLEB."""
    model.model.layers = torch.nn.ModuleList([layers[b] for b in kept])
    model.config.num_hidden_layers = len(kept)  # the decoder loops over layers[:num_hidden_layers]
    return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def brute_force_greedy(model_dir, ids, k, protected):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = list(model.model.layers)
    remaining, rounds = list(range(len(layers))), []
    for _ in range(k):
        losses = {b: hf_loss(model, layers, [c for c in remaining if c != b], ids)
                  for b in remaining if b not in protected}
        best = min(losses, key=lambda b: (losses[b], b))
        rounds.append((best, losses))
        remaining.remove(best)
    return rounds


def expected_forwards(num_remaining, candidates):
    """Trial p runs the blocks after position p; the stream advances once per position before the last candidate."""
    return sum(num_remaining - 1 - p for p in candidates) + max(candidates)


@pytest.mark.parametrize("arch,num_layers,k,options", [
    ("llama", 6, 3, {}),
    ("mistral", 5, 2, {"protect_first": False, "protect_last": False, "samples": 2}),
])
def test_removals_and_losses_equal_an_independent_brute_force(tmp_path, one_thread, arch, num_layers, k, options):
    model_dir = make_model(tmp_path, arch, seed=1, num_layers=num_layers)
    ids = calibration(seq_len=20)  # longer than mistral's sliding window of 8
    search = search_inputs(model_dir, ids)
    calls = {"run": 0, "load": 0}
    run_block, load_block = search.runner.run_block, search.runner.load_block

    def counted_run(*args, **kwargs):
        calls["run"] += 1
        return run_block(*args, **kwargs)

    def counted_load(*args, **kwargs):
        calls["load"] += 1
        return load_block(*args, **kwargs)

    search.runner.run_block, search.runner.load_block = counted_run, counted_load
    plan = get_method({"method": "sleb", **options}).choose(k, search=search)

    protected = {b for b, on in ((0, options.get("protect_first", True)),
                                 (num_layers - 1, options.get("protect_last", True))) if on}
    expected = brute_force_greedy(model_dir, ids[:options.get("samples") or len(ids)], k, protected)
    assert [step["removed"] for step in plan.steps] == [best for best, _ in expected]
    remaining = list(range(num_layers))
    for r, (step, (best, losses)) in enumerate(zip(plan.steps, expected), start=1):
        assert step["round"] == r
        assert set(step["losses"]) == {str(b) for b in losses}
        for block, loss in losses.items():
            assert step["losses"][str(block)] == pytest.approx(loss, abs=1e-5)
        assert step["loss"] == step["losses"][str(best)]
        candidates = [p for p, b in enumerate(remaining) if b not in protected]
        assert step["block_forwards"] == expected_forwards(len(remaining), candidates)
        remaining.remove(best)

    assert plan.kept_blocks == remaining
    assert plan.method == "sleb" and plan.remove_blocks == k
    assert plan.cost == {"block_forwards": sum(step["block_forwards"] for step in plan.steps)}
    assert calls["run"] == plan.cost["block_forwards"]  # the count is of real forwards
    assert calls["load"] == num_layers  # everything fits the default budget: each block read once


def test_a_tiny_resident_budget_reloads_blocks_but_chooses_the_same(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=2, num_layers=5)
    ids = calibration()
    roomy = SLEB().choose(2, search=search_inputs(model_dir, ids))
    search = search_inputs(model_dir, ids, resident_bytes=1)
    loads = {"n": 0}
    load_block = search.runner.load_block
    search.runner.load_block = lambda *a, **kw: (loads.__setitem__("n", loads["n"] + 1), load_block(*a, **kw))[1]
    tight = SLEB().choose(2, search=search)
    assert tight.steps == roomy.steps and tight.cost == roomy.cost
    assert loads["n"] > 5  # one block resident at a time: blocks are read again between trials


def test_protected_blocks_are_never_removed_and_too_many_removals_are_refused(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=3, num_layers=4)
    ids = calibration(n=2)
    plan = SLEB().choose(2, search=search_inputs(model_dir, ids))
    assert plan.removed_blocks == [1, 2] and plan.kept_blocks == [0, 3]
    assert all(set(step["losses"]) <= {"1", "2"} for step in plan.steps)

    only_last = SLEB({"protect_first": False}).choose(1, search=search_inputs(model_dir, ids))
    assert set(only_last.steps[0]["losses"]) == {"0", "1", "2"}
    lines = []
    every = SLEB({"samples": 5}).choose(1, search=search_inputs(model_dir, ids, log=lines.append))
    assert any("only 2 calibration sequences" in line for line in lines), lines
    assert every.steps == SLEB().choose(1, search=search_inputs(model_dir, ids)).steps
    assert SLEB().max_removable(4) == 2 and SLEB({"protect_last": False}).max_removable(4) == 3
    assert SLEB({"protect_first": False, "protect_last": False}).max_removable(4) == 3

    search = search_inputs(model_dir, ids)

    def no_forward(*args, **kwargs):
        raise AssertionError("k must be checked before any block forward")

    search.runner.run_block = no_forward
    with pytest.raises(MethodError, match="remove_blocks") as err:
        SLEB().choose(3, search=search)
    assert "protect_first=True" in str(err.value) and "protect_last=True" in str(err.value)
    assert "at most 2" in str(err.value)
    with pytest.raises(MethodError, match="remove_blocks"):
        SLEB({"protect_first": False, "protect_last": False}).choose(4, search=search)


def test_options_are_checked():
    assert SLEB.OPTIONS == {"protect_first": True, "protect_last": True, "samples": None}
    assert set(SLEB.CHOICE_OPTIONS) == set(SLEB.OPTIONS)
    assert SLEB.chooses_with == "model" and not SLEB.fits
    for bad in ({"samples": 0}, {"samples": 1.5}, {"protect_first": "yes"}, {"barrier": 2}):
        with pytest.raises(MethodError):
            SLEB(bad)


def test_ties_go_to_the_lower_block_index(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=4, num_layers=5)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for b in (1, 3):  # both residual branches zero: the block is exactly the identity
            model.model.layers[b].self_attn.o_proj.weight.zero_()
            model.model.layers[b].mlp.down_proj.weight.zero_()
    model.save_pretrained(model_dir)
    ids = calibration()
    plan = SLEB().choose(2, search=search_inputs(model_dir, ids))
    first, second = plan.steps
    assert first["losses"]["1"] == first["losses"]["3"]  # bit-equal, not merely close
    assert first["losses"]["1"] < first["losses"]["2"]
    assert first["removed"] == 1 and second["removed"] == 3
    assert plan.removed_blocks == [1, 3]


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)  # as the parent's one_thread: the same floats on both sides
    from flattengpt.blockwise import BlockwiseModel
    from flattengpt.methods import SearchInputs
    from flattengpt.methods.search import SearchState
    from flattengpt.methods.sleb import SLEB

    model_dir, ids_file, state_dir = sys.argv[1:4]
    save = SearchState.save

    def save_then_die(self, progress):
        save(self, progress)
        os.kill(os.getpid(), signal.SIGKILL)  # dies like a preempted job, right after the first round's save

    SearchState.save = save_then_die
    search = SearchInputs(runner=BlockwiseModel(model_dir), input_ids=torch.load(ids_file), batch_size=2,
                          state_dir=Path(state_dir))
    SLEB().choose(3, search=search)
    print("not killed")
""")


def test_a_killed_search_resumes_to_the_same_removals(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=5, num_layers=6)
    ids = calibration()
    torch.save(ids, tmp_path / "ids.pt")
    state_dir = tmp_path / "state"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "ids.pt"), str(state_dir)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    saved = json.loads((state_dir / "state.json").read_text())["progress"]
    assert len(saved["removed"]) == 1 and len(saved["steps"]) == 1

    reference = SLEB().choose(3, search=search_inputs(model_dir, ids))
    lines = []
    search = search_inputs(model_dir, ids, state_dir=state_dir, log=lines.append)
    run_block, calls = search.runner.run_block, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return run_block(*args, **kwargs)

    search.runner.run_block = counted
    resumed = SLEB().choose(3, search=search)

    assert any("resumed after round 1" in line for line in lines), lines
    assert resumed.removed_blocks == reference.removed_blocks
    assert [s["removed"] for s in resumed.steps] == [s["removed"] for s in reference.steps]
    for got, want in zip(resumed.steps, reference.steps):
        assert got.keys() == want.keys() and got["block_forwards"] == want["block_forwards"]
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-9)
    assert resumed.cost == reference.cost  # the killed run's forwards are counted too
    assert calls["n"] == sum(s["block_forwards"] for s in reference.steps[1:])  # round 1 was not redone
    assert not (state_dir / "state.json").exists()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_the_compressed_model_reloads_with_the_recorded_loss(tmp_path, one_thread, arch):
    model_dir = make_model(tmp_path, arch, seed=6, num_layers=5)
    ids = calibration(seq_len=20)
    plan = SLEB().choose(2, search=search_inputs(model_dir, ids))
    out = tmp_path / "out"
    compress_model(model_dir, plan, None, out, method="sleb")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    assert loss == pytest.approx(plan.steps[-1]["loss"], abs=1e-5)
