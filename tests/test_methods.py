"""FlattenGPT's math end to end, checked against independent computations on the saved model.

Every test compresses a tiny random model with compress_model, reloads the output with vanilla
transformers and recomputes what the method should have done from the original model's own
modules (head output norms, ridge leverage scores, the regression targets, the o_proj refit,
next-token NLL), without the package's pruning code. The recorded statistics in compression.json
are held to the same independent numbers, so that a selection, target or refit that is wrong
but self-consistent still fails.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flattengpt.compress import compress_model

from .models_for_tests import make_model
from .test_compress import all_tensors
from .test_flatten import layer_kwargs, load_reference
from .test_prune import hand_head_scores

PLAN = [[0], [1, 2], [3]]
GROUP = [1, 2]  # the flattened group of PLAN, output layer 1
HD = 16  # head_dim of the tiny models


def calibration(n=8, seq_len=24, seed=0):
    return torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def quiet(_message):
    pass


def compress(model_dir, ids, out, plan=PLAN, **options):
    record = compress_model(model_dir, plan, ids, out, log=quiet, **options)
    assert json.loads((out / "compression.json").read_text())["group_stats"] == json.loads(
        json.dumps(record["group_stats"]))
    return record


# ----------------------------------------------------------------------------- independent computations


def output(result):
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def hidden_inputs(model, ids):
    """X_0 .. X_{L-1}: the input of every block of `model` (transformers' own forward)."""
    return model(ids, output_hidden_states=True).hidden_states[:-1]  # the last entry is after the final norm


@torch.no_grad()
def o_proj_input(layer, x, kwargs):
    """z: the input of the block's o_proj (all heads' A_i V_i) on the block input x."""
    seen = {}
    handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("z", args[0]))
    try:
        layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    finally:
        handle.remove()
    return seen["z"]


def top_k(scores, k):
    """The indices of the k largest scores, ascending, and the gap between the k-th and the (k+1)-th score."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    gap = float(scores[order[k - 1]] - scores[order[k]]) if k < len(scores) else math.inf
    return sorted(order[:k]), gap


@torch.no_grad()
def independent_group(model, blocks, x, lambda_factor=10.0):
    """What FlattenGPT should do with `blocks` on input x, from the original modules (no package code).

    Heads: token-mean ||A_i V_i W_O,i^T|| (hand_head_scores), KV groups by summed scores; h = x plus the kept
    heads' outputs; MLP: psi = act(gate(N2(h))) * up(N2(h)) of every block, C = psi^T psi,
    lambda = c trace(C) / n, s = diag(C (C + lambda I)^-1), the top-I channels.
    """
    config = model.config
    H, KV, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    size = H // KV
    layers = [model.model.layers[i] for i in blocks]
    kwargs = layer_kwargs(model, x)
    head_scores = torch.cat([hand_head_scores(model, i, x) for i in blocks])
    group_scores = head_scores.reshape(-1, size).sum(1)
    kept_kv, kv_gap = top_k(group_scores, KV)
    kept_heads = [g * size + j for g in kept_kv for j in range(size)]
    h = x.clone()
    for b, layer in enumerate(layers):
        z, W_o = o_proj_input(layer, x, kwargs), layer.self_attn.o_proj.weight
        for head in range(H):
            if b * H + head in kept_heads:
                cols = slice(head * HD, (head + 1) * HD)
                h += z[..., cols] @ W_o[:, cols].T
    psi = torch.cat([layer.mlp.act_fn(layer.mlp.gate_proj(u)) * layer.mlp.up_proj(u)
                     for layer in layers for u in [layer.post_attention_layernorm(h)]], dim=-1)
    psi = psi.reshape(-1, psi.shape[-1]).double()
    C = psi.T @ psi
    n = C.shape[0]
    lam = lambda_factor * float(torch.trace(C)) / n
    leverage = torch.diagonal(C @ torch.linalg.inv(C + lam * torch.eye(n, dtype=C.dtype)))
    kept_channels, channel_gap = top_k(leverage, I)
    return {"head_scores": head_scores, "kept_kv": kept_kv, "kept_heads": kept_heads, "kv_gap": kv_gap,
            "h": h, "leverage": leverage, "kept_channels": kept_channels, "channel_gap": channel_gap}


def match_rows(saved, wide, rows_per_item):
    """Which item (a run of rows_per_item rows) of `wide` every item of `saved` is a copy of."""
    saved = saved.reshape(-1, rows_per_item * saved.shape[1]).double()
    wide = wide.reshape(-1, rows_per_item * wide.shape[1]).double()
    distance = torch.cdist(saved, wide)
    found = distance.argmin(1)
    assert torch.all(distance.min(1).values <= 1e-6 * wide.norm(dim=1).max()), "a saved row is no row of the wide block"
    return found.tolist()


def kept_in_saved_layer(model, blocks, saved_layer):
    """(KV groups, query heads, MLP channels) of the wide block that the saved layer's q/k/gate rows are."""
    layers = [model.model.layers[i] for i in blocks]

    def folded(part, role, norm):  # the wide block's rows with the norm scales folded in, as the paper flattens
        return torch.cat([getattr(getattr(layer, part), role).weight * getattr(layer, norm).weight for layer in layers])

    heads = match_rows(saved_layer.self_attn.q_proj.weight, folded("self_attn", "q_proj", "input_layernorm"), HD)
    kv = match_rows(saved_layer.self_attn.k_proj.weight, folded("self_attn", "k_proj", "input_layernorm"), HD)
    channels = match_rows(saved_layer.mlp.gate_proj.weight, folded("mlp", "gate_proj", "post_attention_layernorm"), 1)
    assert channels == match_rows(saved_layer.mlp.up_proj.weight, folded("mlp", "up_proj", "post_attention_layernorm"),
                                  1)
    return kv, heads, channels


def assert_selection_matches(stats, expected, model, blocks, saved_layer):
    """The recorded scores and kept indices, and the saved rows, are the independent top-k."""
    assert expected["kv_gap"] > 1e-4 and expected["channel_gap"] > 1e-5, "near-tie: the check would be arbitrary"
    recorded = torch.tensor(stats["heads"]["head_scores"], dtype=torch.float64)
    torch.testing.assert_close(recorded, expected["head_scores"], rtol=1e-4, atol=2e-6)
    assert stats["heads"]["kept_kv_groups"] == expected["kept_kv"]
    assert stats["heads"]["kept_query_heads"] == expected["kept_heads"]
    leverage = expected["leverage"]
    summary = stats["mlp"]["leverage_summary"]
    for key, value in (("min", leverage.min()), ("mean", leverage.mean()), ("max", leverage.max())):
        assert math.isclose(summary[key], float(value), rel_tol=1e-4, abs_tol=1e-6), (key, summary, float(value))
    kv, heads, channels = kept_in_saved_layer(model, blocks, saved_layer)
    assert kv == expected["kept_kv"] and heads == expected["kept_heads"]
    assert channels == expected["kept_channels"]
    assert stats["mlp"]["kept_channels"] == len(channels)


@torch.no_grad()
def mean_nll(model, ids):
    logits = model(ids).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)))


@torch.no_grad()
def sum_sq(t):
    return float(t.double().pow(2).sum())


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("arch,lambda_factor", [("llama", 10.0), ("qwen2", 1.0), ("llama-mha", 10.0)])
def test_kept_kv_groups_and_channels_are_the_top_scores_recomputed_independently(tmp_path, one_thread, arch,
                                                                                   lambda_factor):
    model_dir = make_model(tmp_path, arch)
    ids = calibration()
    record = compress(model_dir, ids, tmp_path / "out", lambda_factor=lambda_factor)
    model, saved = load_reference(model_dir), load_reference(tmp_path / "out")
    x = hidden_inputs(model, ids)[GROUP[0]]  # block 0 is kept as it is: the group's input is the original X_1
    expected = independent_group(model, GROUP, x, lambda_factor)
    assert_selection_matches(record["group_stats"][1], expected, model, GROUP, saved.model.layers[1])


def test_second_flattened_group_is_selected_on_the_output_of_the_compressed_first(tmp_path, one_thread):
    """Groups [1, 2] and [4, 5]: the second group's input is the partially compressed model's, not the original's."""
    model_dir = make_model(tmp_path, "llama", num_layers=6)
    ids = calibration()
    plan = [[0], [1, 2], [3], [4, 5]]
    record = compress(model_dir, ids, tmp_path / "out", plan=plan)
    # independently: only the first group compressed, reloaded, and its hidden states at block 4's input
    partial = compress(model_dir, ids, tmp_path / "partial", plan=[[0], [1, 2], [3], [4], [5]])
    assert partial["group_stats"][1] | {"seconds": 0} == record["group_stats"][1] | {"seconds": 0}
    model, partial_model = load_reference(model_dir), load_reference(tmp_path / "partial")
    x = hidden_inputs(partial_model, ids)[3]  # output layer 3 of the partial model is source block 4
    expected = independent_group(model, [4, 5], x)
    saved = load_reference(tmp_path / "out")
    assert saved.config.num_hidden_layers == 4
    assert_selection_matches(record["group_stats"][3], expected, model, [4, 5], saved.model.layers[3])
    # and the original model's input of block 4 would have given other scores: the propagation is what is checked
    uncompressed = independent_group(model, [4, 5], hidden_inputs(model, ids)[4])
    assert (uncompressed["head_scores"] - expected["head_scores"]).abs().max() > 100 * 2e-6
    assert not torch.allclose(uncompressed["leverage"], expected["leverage"], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- the fits


@torch.no_grad()
def group_outputs(model, saved_layer, blocks, x):
    """On the group input x: the original blocks in sequence, the flattened block and the saved layer's parts."""
    kwargs = layer_kwargs(model, x)
    layers = [model.model.layers[i] for i in blocks]
    y_original = x
    for layer in layers:
        y_original = output(layer(y_original, **kwargs))
    wide_attention = sum(output(layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)) for layer in layers)
    saved_attention = output(saved_layer.self_attn(hidden_states=saved_layer.input_layernorm(x), **kwargs))
    h = x + saved_attention  # the residual after the pruned attention: the MLP's input
    wide_mlp = sum(layer.mlp(layer.post_attention_layernorm(h)) for layer in layers)
    y_saved = output(saved_layer(x, **kwargs))
    return {"original": y_original, "wide_attention": wide_attention, "saved_attention": saved_attention, "h": h,
            "wide_mlp": wide_mlp, "saved_mlp": y_saved - h, "saved": y_saved}


def assert_close_error(recorded, expected, what):
    assert math.isclose(recorded, expected, rel_tol=1e-4, abs_tol=1e-9), (what, recorded, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recorded_mlp_errors_are_the_saved_blocks_errors_and_the_original_target_fits_the_original_better(
        tmp_path, one_thread, arch):
    """The `original` target is y - h: the saved block's output misses the original blocks' by exactly the recorded
    error, and by less than the `flattened` target's block does; the `flattened` target is the wide MLP's output."""
    model_dir = make_model(tmp_path, arch)
    ids = calibration()
    model = load_reference(model_dir)
    x = hidden_inputs(model, ids)[GROUP[0]]
    errors, kept = {}, {}
    for target in ("flattened", "original"):
        out = tmp_path / target
        mlp = compress(model_dir, ids, out, compensation_target=target)["group_stats"][1]["mlp"]
        saved_layer = load_reference(out).model.layers[1]
        kept[target] = kept_in_saved_layer(model, GROUP, saved_layer)
        got = group_outputs(model, saved_layer, GROUP, x)
        tokens = x.shape[0] * x.shape[1]
        vs_flattened = sum_sq(got["wide_mlp"] - got["saved_mlp"])  # against R = psi W
        vs_original = sum_sq(got["original"] - got["saved"])  # against R = y - h: (y - h) - MLP(h) = y - output
        errors[target] = vs_original
        if target == "original":
            assert mlp["target"] == "original"
            assert_close_error(mlp["error"]["target_rms"] ** 2 * tokens, sum_sq(got["original"] - got["h"]),
                               "||y - h||^2")
            assert_close_error(mlp["error"]["error_compensated"], vs_original, "error vs the original output")
            assert_close_error(mlp["error_vs_flattened"]["error_compensated"], vs_flattened, "error vs psi W")
            assert_close_error(mlp["error_vs_flattened"]["target_rms"] ** 2 * tokens, sum_sq(got["wide_mlp"]),
                               "||psi W||^2")
        else:
            assert "error_vs_flattened" not in mlp
            assert_close_error(mlp["error"]["target_rms"] ** 2 * tokens, sum_sq(got["wide_mlp"]), "||psi W||^2")
            assert_close_error(mlp["error"]["error_compensated"], vs_flattened, "error vs psi W")
    # the same kept heads and channels (the selection does not read the target), fitted to the original residual:
    # closer to the original output
    assert kept["original"] == kept["flattened"]
    assert errors["original"] < 0.95 * errors["flattened"], errors


@torch.no_grad()
def independent_o_refit(model, blocks, x, kept_heads, lambda_factor=10.0):
    """B = (Z_S^T Z_S + lambda I)^-1 (Z_S^T Z W + lambda W_S), W = W_O^T of the wide block, lambda = c tr(Z^T Z) / n."""
    kwargs = layer_kwargs(model, x)
    layers = [model.model.layers[i] for i in blocks]
    Z = torch.cat([o_proj_input(layer, x, kwargs) for layer in layers], dim=-1)
    Z = Z.reshape(-1, Z.shape[-1]).double()
    W = torch.cat([layer.self_attn.o_proj.weight for layer in layers], dim=1).T.double()
    cols = torch.tensor([head * HD + j for head in kept_heads for j in range(HD)])
    C = Z.T @ Z
    lam = lambda_factor * float(torch.trace(C)) / C.shape[0]
    Z_S = Z[:, cols]
    B = torch.linalg.solve(Z_S.T @ Z_S + lam * torch.eye(len(cols), dtype=C.dtype), Z_S.T @ (Z @ W) + lam * W[cols])
    return B.T, W.T[:, cols]  # the refitted o_proj weight, and the sliced one


def test_attention_refit_lowers_the_attention_error_and_is_what_is_saved(tmp_path, one_thread):
    model_dir = make_model(tmp_path, "llama")
    ids = calibration()
    model = load_reference(model_dir)
    x = hidden_inputs(model, ids)[GROUP[0]]
    runs = {}
    for refit in (False, True):
        out = tmp_path / f"refit-{refit}"
        record = compress(model_dir, ids, out, attn_compensation=refit)
        saved = load_reference(out)
        heads = record["group_stats"][1]["heads"]
        got = group_outputs(model, saved.model.layers[1], GROUP, x)
        error = sum_sq(got["wide_attention"] - got["saved_attention"])  # against the flattened attention output
        runs[refit] = {"heads": heads, "error": error, "o": saved.model.layers[1].self_attn.o_proj.weight.clone(),
                       "nll": mean_nll(saved, ids), "recorded_nll": record["calibration_nll"]}
        assert heads["attention_error"]["refit_applied"] is refit
        assert_close_error(heads["attention_error"]["error_compensated" if refit else "error_plain"], error,
                           "attention error of the saved block")
        refitted, sliced = independent_o_refit(model, GROUP, x, heads["kept_query_heads"])
        expected = refitted if refit else sliced
        torch.testing.assert_close(saved.model.layers[1].self_attn.o_proj.weight.double(), expected,
                                   rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert math.isclose(runs[refit]["nll"], runs[refit]["recorded_nll"], rel_tol=1e-5)
    plain, refit = runs[False], runs[True]
    assert plain["heads"]["kept_query_heads"] == refit["heads"]["kept_query_heads"]  # the refit changes no selection
    assert refit["error"] < 0.99 * plain["error"], (refit["error"], plain["error"])
    assert not torch.allclose(refit["o"], plain["o"], rtol=1e-3, atol=1e-5)
    assert abs(refit["nll"] - plain["nll"]) > 1e-5


# ----------------------------------------------------------------------------- the compressed model's quality


DEAD = 0.05  # the scale of the "dead" heads and channels


def redundant_model(root, seed=0):
    """A random model whose blocks 1 and 2 each have one near-silent KV group and half near-silent MLP channels.

    So the flattened pair holds about one block's worth of live heads and channels: the right selection keeps
    nearly everything that matters, dropping block 2 loses a whole block, and the error left is mostly the
    flattening error (block 2 sees x, not block 1's output), which only the `original` target fits. A scaled
    lm_head makes the model confident, so that NLL on its own samples measures how close a compressed model is.
    """
    path = make_model(root, "llama", seed=seed, initializer_range=0.05)
    model = load_reference(path)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in GROUP:
            layer, dead_group = model.model.layers[i], i - GROUP[0]  # block 1: KV group 0, block 2: KV group 1
            layer.self_attn.o_proj.weight[:, dead_group * 2 * HD:(dead_group + 1) * 2 * HD] *= DEAD
            layer.mlp.up_proj.weight[torch.randperm(96, generator=g)[:48]] *= DEAD
        model.lm_head.weight *= 5
    model.save_pretrained(path)
    return path, model


@torch.no_grad()
def sample(model, n=16, seq_len=32, seed=0):
    """Sequences sampled from the model itself (temperature 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=g)
    for _ in range(seq_len - 1):
        probs = torch.softmax(model(ids).logits[:, -1].double(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return ids


def test_flattengpt_beats_drop_and_the_original_target_beats_the_flattened_on_calibration_nll(tmp_path, one_thread):
    model_dir, model = redundant_model(tmp_path)
    ids = sample(model)
    nll = {"uncompressed": mean_nll(model, ids)}
    for name, options in (("drop", {"method": "drop"}), ("flattened", {}),
                          ("original", {"compensation_target": "original"})):
        out = tmp_path / name
        record = compress(model_dir, ids, out, **options)
        saved = load_reference(out)
        assert saved.config.num_hidden_layers == 3
        nll[name] = mean_nll(saved, ids)
        if name != "drop":  # the driver's NLL is the saved model's
            assert math.isclose(record["calibration_nll"], nll[name], rel_tol=1e-5), (record["calibration_nll"], nll)
            heads = record["group_stats"][1]["heads"]["kept_kv_groups"]
            assert heads == [1, 2], "the live KV groups: block 1's second, block 2's first"
    # measured on this model: uncompressed 0, drop +0.97, flattened +0.57, original +0.35 nats per token
    excess = {k: v - nll["uncompressed"] for k, v in nll.items()}
    assert excess["original"] < 0.8 * excess["flattened"], excess
    assert excess["flattened"] < 0.8 * excess["drop"], excess
    assert excess["original"] > 0, excess
    # the drop model is the original without block 2 (bit for bit)
    source, dropped = all_tensors(model_dir), all_tensors(tmp_path / "drop")
    assert torch.equal(dropped["model.layers.2.mlp.down_proj.weight"], source["model.layers.3.mlp.down_proj.weight"])


def test_a_flattened_span_of_three_blocks_beats_dropping_two_of_them(tmp_path, one_thread):
    """plan_criterion span's shape: one group of k + 1 blocks (here 1-3, k = 2) fitted beats deleting blocks 2-3."""
    model_dir, model = redundant_model(tmp_path)
    ids = sample(model)
    base = mean_nll(model, ids)
    span = [[0], [1, 2, 3]]
    excess = {}
    for name, options in (("drop", {"method": "drop"}), ("original", {"compensation_target": "original"})):
        out = tmp_path / name
        compress(model_dir, ids, out, plan=span, **options)
        saved = load_reference(out)
        assert saved.config.num_hidden_layers == 2
        excess[name] = mean_nll(saved, ids) - base
    # measured: drop +1.44, original +0.87 nats per token
    assert 0 < excess["original"] < 0.8 * excess["drop"], excess
