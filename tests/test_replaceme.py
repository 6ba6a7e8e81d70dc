"""ReplaceMe: the span choice, the exactness and optimality of the fitted map, its fold into down_proj."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt.compress import compress_model
from flattengpt.methods import SimilarityViews, get_method
from flattengpt.methods.base import MethodError
from flattengpt.methods.replaceme import replaceme_plan
from flattengpt.plan import Plan

from .models_for_tests import make_model
from .test_compress import all_tensors

NUM_LAYERS = 6
SPAN = (2, 2)  # l, k: blocks 2-3 removed, folded into block 1; X_4 is the residual stream after the span


def distances(num_layers=NUM_LAYERS, start=SPAN[0], k=SPAN[1], low=0.05):
    """An angular-distance matrix whose spans of k blocks all score 0.5, except d(start, start + k) = low."""
    D = np.full((num_layers + 1, num_layers + 1), 0.5)
    np.fill_diagonal(D, 0.0)
    D[start, start + k] = low
    return D


def views(D):
    n = D.shape[0]
    return SimilarityViews(np.eye(n), D, np.zeros(n - 1))


def ids_for(n, seq_len, seed, vocab=128):
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def patch_stats(record):
    (stats,) = [s for s in record["group_stats"] if s.get("op") == "patch"]
    return stats


@torch.no_grad()
def span_regression(model_dir, ids, a, c):
    """M and R computed independently of the method, with vanilla transformers, in float64.

    h (the input of block a's MLP norm) by a hook; then M = X_{a+1} - h (block a's MLP output, as
    y_a = h + M) and R = X_{c+1} - h (what the MLP must add to reach the residual after block c).
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    seen = {}
    handle = model.model.layers[a].post_attention_layernorm.register_forward_pre_hook(
        lambda module, args: seen.__setitem__("h", args[0]))
    states = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    h = seen["h"].double()
    d = h.shape[-1]
    M = (states[a + 1].double() - h).reshape(-1, d).numpy()
    R = (states[c + 1].double() - h).reshape(-1, d).numpy()
    return M, R


@torch.no_grad()
def mean_nll(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return float(model(ids, labels=ids).loss)


# ----------------------------------------------------------------------------- the choice


def test_span_minimizes_the_angular_distance_over_starts_after_block_0():
    method = get_method({"method": "replaceme"})
    plan = method.choose(2, views=views(distances(start=3)))
    assert [(layer.op, layer.blocks) for layer in plan.layers] == [
        ("keep", [0]), ("keep", [1]), ("patch", [2, 3, 4]), ("keep", [5])]
    assert plan.kept_blocks == [0, 1, 2, 5] and plan.removed_blocks == [3, 4] and plan.dropped_blocks == []
    assert plan.method == "replaceme" and plan.validate().remove_blocks == 2
    assert [s["start"] for s in plan.steps if s["chosen"]] == [3]

    # ties go to the lower start
    D = distances(start=2)
    D[4, 6] = D[2, 4]
    assert replaceme_plan(D, 2).layers[1].blocks == [1, 2, 3]

    # a minimum at l = 0 is skipped: no block before the cut could take the map; the next best wins
    D = distances(start=0, low=0.01)
    D[3, 5] = 0.2
    plan = replaceme_plan(D, 2)
    assert [(layer.op, layer.blocks) for layer in plan.layers] == [
        ("keep", [0]), ("keep", [1]), ("patch", [2, 3, 4]), ("keep", [5])]
    assert {s["start"]: s["eligible"] for s in plan.steps}[0] is False

    # a span starting at block 1 patches block 0; the largest k leaves block 0 alone, patched
    assert replaceme_plan(distances(start=1), 2).layers[0].blocks == [0, 1, 2]
    assert [(layer.op, layer.blocks) for layer in replaceme_plan(distances(), NUM_LAYERS - 1).layers] == [
        ("patch", list(range(NUM_LAYERS)))]


def test_options_are_checked():
    assert get_method({"method": "replaceme"}).options["lambda_factor"] == 0.0
    assert get_method({"method": "replaceme", "lambda_factor": 2}).options["lambda_factor"] == 2.0
    assert get_method({"method": "replaceme", "lambda_factor": "auto"}).options["lambda_factor"] == "auto"
    for key, bad in (("validation_fraction", 1.0), ("validation_seed", 0.5), ("lambda_grid", [])):
        with pytest.raises(MethodError, match=key):
            get_method({"method": "replaceme", "lambda_factor": "auto", key: bad})
    for bad in (-1.0, True, "1"):
        with pytest.raises(MethodError, match="lambda_factor"):
            get_method({"method": "replaceme", "lambda_factor": bad})
    with pytest.raises(MethodError, match="unknown option"):
        get_method({"method": "replaceme", "protect_first": True})


# ----------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama-mha"])
def test_fewer_tokens_than_width_reproduce_the_span_exactly(tmp_path, one_thread, arch):
    # 2 windows x 12 tokens = 24 < d = 64: M T = R has exact solutions, the min-norm one is used
    model_dir = make_model(tmp_path, arch, seed=1, num_layers=NUM_LAYERS)
    ids = ids_for(2, 12, seed=3)
    l, k = SPAN
    out = tmp_path / "out"
    record = compress_model(model_dir, replaceme_plan(distances(), k), ids, out, method="replaceme", batch_size=1)
    stats = patch_stats(record)
    assert stats["blocks"] == [l - 1, l, l + 1] and stats["tokens"] == 24
    assert stats["solve"]["method"] == "pinv" and stats["solve"]["rank"] == 24
    assert stats["rel_sq_error_fit"] < 1e-6 and stats["rel_sq_error_plain_drop"] > 0.5

    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids, output_hidden_states=True)
        compressed = AutoModelForCausalLM.from_pretrained(out).eval()(ids, output_hidden_states=True)
    assert len(compressed.hidden_states) == NUM_LAYERS - k + 1
    want, got = original.hidden_states[l + k], compressed.hidden_states[l]  # after the patched layer l - 1
    assert float((got - want).norm() / want.norm()) < 1e-4
    # without the map the stream after the cut would be y_{l-1}, far from X_{l+k}
    assert float((original.hidden_states[l] - want).norm() / want.norm()) > 1e-2

    # every tensor but block l-1's down_proj is the stored one, bit for bit (blocks renumbered)
    source, saved = all_tensors(model_dir), all_tensors(out)
    for new, old in enumerate([0, 1, 4, 5]):
        for name in [n for n in source if n.startswith(f"model.layers.{old}.")]:
            same = torch.equal(saved[name.replace(f"layers.{old}.", f"layers.{new}.")], source[name])
            assert same != (name == f"model.layers.{l - 1}.mlp.down_proj.weight"), name
    json.loads((out / "compression.json").read_text())  # the stats are plain JSON


def test_fit_never_loses_to_plain_dropping_and_matches_numpy_least_squares(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama", seed=2, num_layers=NUM_LAYERS)
    ids = ids_for(8, 32, seed=4)  # 256 tokens > d = 64: the lambda = 0 fit is the unique least-squares one
    l, k = SPAN
    a, c = l - 1, l + k - 1
    plan = replaceme_plan(distances(), k)
    M, R = span_regression(model_dir, ids, a, c)
    T, *_ = np.linalg.lstsq(M, R, rcond=None)
    plain_np, fit_np = float(((M - R) ** 2).sum()), float(((M @ T - R) ** 2).sum())

    fits = {}
    for factor in (0.0, 1e-3, 1.0, 100.0):
        out = tmp_path / f"out-{factor}"
        stats = patch_stats(compress_model(model_dir, plan, ids, out, method="replaceme", batch_size=3,
                                           lambda_factor=factor))
        assert stats["lambda_factor"] == factor and stats["tokens"] == 256
        assert stats["error_fit"] <= stats["error_plain_drop"]
        assert stats["error_plain_drop"] == pytest.approx(plain_np, rel=1e-6)
        assert stats["solve"]["method"] == ("pinv" if factor == 0 else "cholesky")
        assert stats["solve"]["relative_residual"] < 1e-8
        fits[factor] = stats["error_fit"]
        if factor == 0:
            assert stats["lambda"] == 0 and stats["solve"]["rank"] == 64
            assert stats["error_fit"] == pytest.approx(fit_np, rel=1e-5)
            # the fold: the saved down_proj is T^T W_down with numpy's T
            W = all_tensors(model_dir)[f"model.layers.{a}.mlp.down_proj.weight"].double().numpy()
            new = all_tensors(out)[f"model.layers.{a}.mlp.down_proj.weight"].double().numpy()
            assert np.abs(new - T.T @ W).max() < 1e-4 * np.abs(T.T @ W).max()
            assert fit_np < 0.9 * plain_np  # the map does something on this model
    # the ridge pulls T toward the identity: the calibration error rises with lambda toward plain dropping's
    errors = [fits[f] for f in sorted(fits)]
    assert all(x <= y * (1 + 1e-9) for x, y in zip(errors, errors[1:]))


def confident_model(root, seed, scale=10.0, n=16, seq_len=64):
    """A tiny random model with its lm_head scaled up (confident predictions) and n sequences sampled from it.

    On random ids a random model is near uniform whatever its residual stream, so NLLs would differ
    by noise; on its own samples every deviation from the original stream costs likelihood, which
    makes the comparison with plain dropping meaningful (ReplaceMe leads by 0.3-0.6 nats over seeds 0-4).
    """
    model_dir = make_model(root, "llama", seed=seed, num_layers=NUM_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        model.save_pretrained(model_dir)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=generator)
        for _ in range(seq_len - 1):  # plain ancestral sampling: no eos, no padding
            probs = torch.softmax(model(ids).logits[:, -1].double(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return model_dir, ids


def test_calibration_nll_below_plain_dropping(tmp_path, one_thread):
    model_dir, ids = confident_model(tmp_path, seed=0)  # 1024 tokens, 16x the width: no memorising them
    k = SPAN[1]
    patched = tmp_path / "replaceme"
    record = compress_model(model_dir, replaceme_plan(distances(), k), ids, patched, method="replaceme",
                            batch_size=8)
    dropped = tmp_path / "gromov"  # the same span deleted, nothing fitted
    compress_model(model_dir, Plan.from_kept(NUM_LAYERS, [0, 1, 4, 5]), None, dropped, method="gromov")
    nll_original, nll_patched, nll_dropped = (mean_nll(p, ids) for p in (model_dir, patched, dropped))
    assert record["calibration_nll"] == pytest.approx(nll_patched, rel=1e-4)  # the driver's own number agrees
    assert patch_stats(record)["rel_sq_error_fit"] < patch_stats(record)["rel_sq_error_plain_drop"]
    assert nll_original < nll_patched < nll_dropped - 0.1
    print(f"NLL original {nll_original:.4f}, replaceme {nll_patched:.4f}, plain drop {nll_dropped:.4f}")


def test_auto_lambda_curve_equals_one_solve_per_factor_and_the_map_is_refitted_on_all_sequences(tmp_path,
                                                                                                  one_thread):
    model_dir = make_model(tmp_path, "llama", seed=2, num_layers=NUM_LAYERS)
    n, seq_len = 8, 12  # 72 fit tokens for d = 64: an overfitting least squares, so lambda matters
    ids = ids_for(n, seq_len, seed=4)
    l, k = SPAN
    a, c = l - 1, l + k - 1
    out = tmp_path / "out"
    stats = patch_stats(compress_model(model_dir, replaceme_plan(distances(), k), ids, out, method="replaceme",
                                       batch_size=3, lambda_factor="auto", validation_seed=1))
    validation = stats["lambda_validation"]
    held = validation["held_out_sequences"]
    assert len(held) == 2 and stats["tokens"] == n * seq_len
    fit = [i for i in range(n) if i not in held]
    M, R = span_regression(model_dir, ids, a, c)  # rows sequence by sequence
    M, R = M.reshape(n, seq_len, -1), R.reshape(n, seq_len, -1)
    d = M.shape[-1]
    M_fit, R_fit = M[fit].reshape(-1, d), R[fit].reshape(-1, d)
    M_val, R_val = M[held].reshape(-1, d), R[held].reshape(-1, d)
    scale = float((M_fit ** 2).sum()) / d  # trace(G_fit) / d
    grid = validation["map"]["grid"]
    slow = []
    for factor in grid:
        lam = factor * scale
        T = (np.linalg.lstsq(M_fit, R_fit, rcond=None)[0] if lam == 0 else
             np.linalg.solve(M_fit.T @ M_fit + lam * np.eye(d), M_fit.T @ R_fit + lam * np.eye(d)))
        slow.append(float(((M_val @ T - R_val) ** 2).sum()))
    np.testing.assert_allclose(validation["map"]["held_out_error"], slow, rtol=1e-4)
    pick = grid[int(np.argmin(slow))]
    assert stats["lambda_factor"] == validation["map"]["pick"] == pick and pick > 0

    M_all, R_all = M.reshape(-1, d), R.reshape(-1, d)
    lam = pick * float((M_all ** 2).sum()) / d
    T = np.linalg.solve(M_all.T @ M_all + lam * np.eye(d), M_all.T @ R_all + lam * np.eye(d))
    W = all_tensors(model_dir)[f"model.layers.{a}.mlp.down_proj.weight"].double().numpy()
    new = all_tensors(out)[f"model.layers.{a}.mlp.down_proj.weight"].double().numpy()
    assert np.abs(new - T.T @ W).max() < 1e-4 * np.abs(T.T @ W).max()
