"""FlattenGPT's plan_criterion trial_error: scores against an independent compression, exact pair choice, resume."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt.blockwise import BlockwiseModel
from flattengpt.compress import compress_model
from flattengpt.methods import MethodError, SearchInputs, get_method
from flattengpt.methods.trial_plan import best_disjoint_pairs, candidate_pairs
from flattengpt.prune import held_out_split

from .models_for_tests import make_model

NUM_LAYERS = 5
OPTIONS = {"method": "flattengpt", "plan_criterion": "trial_error", "lambda_factor": 1.0,
           "validation_fraction": 0.25, "validation_seed": 2}


def brute_force_pairs(scores, k):
    """Every choice of k disjoint pairs, the least total (ties: the lexicographically first)."""
    best = None
    for chosen in itertools.combinations(sorted(scores), k):
        if all(b - a >= 2 for a, b in zip(chosen, chosen[1:])):
            total = sum(scores[l] for l in chosen)
            if best is None or total < best[0]:
                best = (total, list(chosen))
    return best and best[1]


def test_best_disjoint_pairs_is_the_exact_optimum():
    # greedy would take the cheapest pair (2, 3) and then only (0, 1) or (4, 5) remain: 1 + 5 > 2 + 2
    scores = {0: 5.0, 1: 2.0, 2: 1.0, 3: 2.0, 4: 5.0}
    assert best_disjoint_pairs(scores, 2) == [1, 3] == brute_force_pairs(scores, 2)
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 3 + trial % 6
        scores = {l: float(v) for l, v in enumerate(torch.rand(n, generator=generator))}
        for k in range(1, (n + 1) // 2 + 1):
            assert best_disjoint_pairs(scores, k) == brute_force_pairs(scores, k), (scores, k)
    assert best_disjoint_pairs({0: 1.0, 1: 1.0, 2: 1.0}, 1) == [0]  # ties: the lower block
    with pytest.raises(MethodError, match="disjoint pairs"):
        best_disjoint_pairs({0: 1.0, 1: 1.0}, 2)  # (0, 1) and (1, 2) overlap


def test_candidate_pairs_respect_the_protections():
    assert candidate_pairs(5, False, False) == [0, 1, 2, 3]
    assert candidate_pairs(5, True, True) == [1, 2]


@torch.no_grad()
def independent_score(model_dir, ids, l, fit, held, tmp_path):
    """Compress only the pair (l, l+1) with the driver on the fit sequences, read the error from HF forwards."""
    out = tmp_path / f"pair-{l}"
    groups = [[b] for b in range(l)] + [[l, l + 1]] + [[b] for b in range(l + 2, NUM_LAYERS)]
    compress_model(model_dir, groups, ids[fit], out, lambda_factor=1.0, validation_fraction=0.25,
                   validation_seed=2, log=lambda _m: None, batch_size=2)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids[held], output_hidden_states=True)
    compressed = AutoModelForCausalLM.from_pretrained(out).eval()(ids[held], output_hidden_states=True)
    x, y = original.hidden_states[l].double(), original.hidden_states[l + 2].double()
    got = compressed.hidden_states[l + 1].double()  # below l nothing changed: its input is x
    return float((got - y).pow(2).sum() / (y - x).pow(2).sum())


def test_scores_equal_an_independent_compression_and_the_plan_takes_the_best_pairs(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=3, num_layers=NUM_LAYERS)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    method = get_method(OPTIONS)
    assert method.choice_source(method.options) == "model"
    assert get_method({"method": "flattengpt"}).choice_source({}) == "similarity"
    plan = method.choose(2, search=SearchInputs(runner=BlockwiseModel(model_dir), input_ids=ids, batch_size=2),
                         target={"remove_blocks": 2})
    fit, held = held_out_split(8, 0.25, 2)
    scores = {step["pair"][0]: step["held_out_rel_error"] for step in plan.steps}
    assert sorted(scores) == [0, 1, 2, 3]
    for l in (0, 2):
        assert scores[l] == pytest.approx(independent_score(model_dir, ids, l, fit, held, tmp_path), rel=1e-3)
    chosen = brute_force_pairs(scores, 2)
    assert [g for g in plan.groups if len(g) == 2] == [[l, l + 1] for l in chosen]
    assert sum(len(g) for g in plan.groups) == NUM_LAYERS and len(plan.groups) == NUM_LAYERS - 2
    assert plan.cost["block_forwards"] > 0 and plan.options["criterion"] == "trial_error"


def test_an_interrupted_search_resumes_from_the_saved_scores(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=3, num_layers=NUM_LAYERS)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    state = tmp_path / "state"
    lines = []

    class Stop(Exception):
        pass

    def stop_after_two(message):
        lines.append(message)
        if sum("held-out relative error" in m for m in lines) == 2:
            raise Stop

    def search(log):
        return SearchInputs(runner=BlockwiseModel(model_dir), input_ids=ids, batch_size=2, state_dir=state, log=log)

    with pytest.raises(Stop):
        get_method(OPTIONS).choose(1, search=search(stop_after_two))
    assert (state / "state.json").is_file()
    resumed_lines = []
    resumed = get_method(OPTIONS).choose(1, search=search(resumed_lines.append))
    assert any("resuming" in m for m in resumed_lines)
    assert sum("held-out relative error" in m for m in resumed_lines) == 2  # only the two pairs left
    fresh = get_method(OPTIONS).choose(1, search=SearchInputs(runner=BlockwiseModel(model_dir), input_ids=ids,
                                                              batch_size=2))
    assert resumed.groups == fresh.groups and resumed.steps == fresh.steps


def test_options_and_targets_it_refuses():
    with pytest.raises(MethodError, match="plan_criterion"):
        get_method({"method": "flattengpt", "plan_criterion": "loss"})
    method = get_method(OPTIONS)
    search = SearchInputs(runner=None, input_ids=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(MethodError, match="max_group_size"):
        method.choose(1, search=search, target={"remove_blocks": 1, "max_group_size": 3})
    with pytest.raises(MethodError, match="plan_file"):
        method.choose(1, search=search, target={"plan_file": "plan.yaml"})
    # with the trial criterion every fit option changes the choice
    assert "lambda_factor" in type(method).choice_options(OPTIONS)
    assert "lambda_factor" not in type(method).choice_options({"method": "flattengpt", "lambda_factor": 1.0})
