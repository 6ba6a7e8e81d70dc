"""lambda_factor auto: the held-out curve from one eigendecomposition equals one ridge solve per grid point.

Brute force throughout is the regression on the raw feature rows (no Gram sums, no eigh): for every
lambda, B = solve(F^T F + lambda I, F^T R + lambda P) on the fit rows (lstsq's min-norm solution
at lambda 0) and the held-out error ||R_v - F_v B||^2 on the held-out rows.
"""

import torch

from flattengpt.prune import LAMBDA_GRID, choose_lambda, held_out_split, ridge_path_errors

from .models_for_tests import make_model
from .test_flatten import load_reference
from .test_methods import GROUP, calibration, compress, hidden_inputs, independent_group


def brute_force_errors(F_fit, R_fit, prior, F_val, R_val, lambdas):
    errors = []
    for lam in lambdas:
        if lam > 0:
            A = F_fit.T @ F_fit + lam * torch.eye(F_fit.shape[1], dtype=F_fit.dtype)
            B = torch.linalg.solve(A, F_fit.T @ R_fit + lam * prior)
        else:
            B = torch.linalg.pinv(F_fit) @ R_fit  # min-norm least squares
        errors.append(float((R_val - F_val @ B).pow(2).sum()))
    return errors


def sums(F, R):
    return F.T @ F, F.T @ R, float(R.pow(2).sum())


def regression(rows, n=12, d=5, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(rows, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    truth = torch.randn(n, d, generator=g, dtype=torch.float64)
    return F, F @ truth + noise * torch.randn(rows, d, generator=g, dtype=torch.float64)


def test_ridge_path_errors_equal_one_solve_per_lambda():
    F, R = regression(200)
    F_fit, R_fit, F_val, R_val = F[:150], R[:150], F[150:], R[150:]
    prior = torch.randn(12, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    C_fit, cross_fit, _ = sums(F_fit, R_fit)
    C_val, cross_val, norm2_val = sums(F_val, R_val)
    scale = float(torch.trace(C_fit)) / 12
    lambdas = [c * scale for c in LAMBDA_GRID]
    fast = ridge_path_errors(C_fit, cross_fit, prior, C_val, cross_val, norm2_val, lambdas)
    slow = brute_force_errors(F_fit, R_fit, prior, F_val, R_val, lambdas)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=1e-7, atol=1e-8)
    # the curve is not flat: the grid spans under- and over-regularised fits
    assert max(fast) > 1.5 * min(fast)


def test_fewer_fit_rows_than_features_at_lambda_zero_is_the_min_norm_least_squares():
    F, R = regression(40, n=30)
    C_fit, cross_fit, _ = sums(F[:20], R[:20])  # rank 20 of 30: singular
    C_val, cross_val, norm2_val = sums(F[20:], R[20:])
    prior = torch.zeros(30, 5, dtype=torch.float64)
    fast = ridge_path_errors(C_fit, cross_fit, prior, C_val, cross_val, norm2_val, [0.0])
    slow = brute_force_errors(F[:20], R[:20], prior, F[20:], R[20:], [0.0])
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=1e-6, atol=1e-8)


def test_validating_on_the_fit_split_picks_the_smallest_factor():
    """The training error of ridge grows with lambda: held-out = fit rows must pick the grid's first factor."""
    F, R = regression(100)
    prior = torch.randn(12, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    C, cross, norm2 = sums(F, R)
    choice = choose_lambda(C, cross, prior, C, cross, norm2, LAMBDA_GRID, float(torch.trace(C)) / 12)
    assert choice.pick == min(LAMBDA_GRID)
    assert choice.held_out_error == sorted(choice.held_out_error)
    # without the zero the smallest positive factor wins
    choice = choose_lambda(C, cross, prior, C, cross, norm2, [10.0, 0.1, 1.0], float(torch.trace(C)) / 12)
    assert choice.pick == 0.1 and choice.factors == [0.1, 1.0, 10.0]


def test_an_overfitting_regression_picks_a_larger_factor_than_zero():
    """Few fit rows, many noisy features: least squares overfits, the held-out rows say so."""
    F, R = regression(400, n=30, noise=3.0, seed=1)
    C_fit, cross_fit, _ = sums(F[:40], R[:40])
    C_val, cross_val, norm2_val = sums(F[40:], R[40:])
    choice = choose_lambda(C_fit, cross_fit, torch.zeros(30, 5, dtype=torch.float64), C_val, cross_val, norm2_val,
                           LAMBDA_GRID, float(torch.trace(C_fit)) / 30)
    assert choice.pick > 0
    assert choice.held_out_error[choice.factors.index(choice.pick)] < 0.9 * choice.held_out_error[0]


def test_held_out_split_is_by_sequence_seeded_and_disjoint():
    fit, held = held_out_split(10, 0.25, seed=0)
    assert len(held) == 2 and len(fit) == 8  # round(2.5) = 2
    assert sorted(fit.tolist() + held.tolist()) == list(range(10))
    assert torch.equal(held_out_split(10, 0.25, seed=0)[1], held)
    assert any(not torch.equal(held_out_split(10, 0.25, seed=s)[1], held) for s in range(1, 5))
    assert len(held_out_split(2, 0.9, seed=0)[0]) == 1  # one sequence is always left to fit
    try:
        held_out_split(1, 0.25, seed=0)
    except ValueError as error:
        assert "n_samples" in str(error)
    else:
        raise AssertionError("one sequence cannot be split")


@torch.no_grad()
def test_auto_lambda_on_a_tiny_model_equals_brute_force_and_refits_on_all_sequences(tmp_path, one_thread):
    """The recorded curve, the pick and the saved down_proj, against the raw-row regression of the group."""
    model_dir = make_model(tmp_path, "llama")
    ids = calibration(n=8)
    selection = 1.0
    record = compress(model_dir, ids, tmp_path / "out", lambda_factor="auto", validation_fraction=0.25,
                      validation_seed=3, selection_lambda_factor=selection)
    stats = record["group_stats"][1]
    validation = stats["lambda_validation"]
    held = validation["held_out_sequences"]
    assert held == held_out_split(8, 0.25, seed=3)[1].tolist()
    fit_rows = [i for i in range(8) if i not in held]

    model = load_reference(model_dir)
    x = hidden_inputs(model, ids)[GROUP[0]]
    expected = independent_group(model, GROUP, x, selection)  # channels: leverage at the selection factor
    layers = [model.model.layers[i] for i in GROUP]
    h = expected["h"]
    psi = torch.cat([layer.mlp.act_fn(layer.mlp.gate_proj(u)) * layer.mlp.up_proj(u)
                     for layer in layers for u in [layer.post_attention_layernorm(h)]], dim=-1).double()
    W = torch.cat([layer.mlp.down_proj.weight.T for layer in layers]).double()  # the flattened MLP's W_down^T
    R = psi @ W  # target "flattened"
    keep = expected["kept_channels"]
    rows = lambda seqs: (psi[seqs][..., keep].reshape(-1, len(keep)), R[seqs].reshape(-1, W.shape[1]))  # noqa: E731
    (F_fit, R_fit), (F_val, R_val) = rows(fit_rows), rows(held)
    n = psi.shape[-1]
    scale = float(psi[fit_rows].reshape(-1, n).pow(2).sum()) / n  # trace(C_fit) / n over all wide channels
    grid = validation["mlp"]["grid"]
    slow = brute_force_errors(F_fit, R_fit, W[keep], F_val, R_val, [c * scale for c in grid])
    torch.testing.assert_close(torch.tensor(validation["mlp"]["held_out_error"]), torch.tensor(slow),
                               rtol=1e-4, atol=1e-6)
    pick = grid[min(range(len(slow)), key=lambda i: slow[i])]
    assert validation["mlp"]["pick"] == pick and stats["mlp"]["lambda_factor"] == pick

    # the refit on all eight sequences with the picked factor is what is saved
    F_all, R_all = psi[..., keep].reshape(-1, len(keep)), R.reshape(-1, W.shape[1])
    lam = pick * float(psi.reshape(-1, n).pow(2).sum()) / n
    if lam > 0:
        B = torch.linalg.solve(F_all.T @ F_all + lam * torch.eye(len(keep), dtype=torch.float64),
                               F_all.T @ R_all + lam * W[keep])
    else:
        B = torch.linalg.pinv(F_all) @ R_all
    saved = load_reference(tmp_path / "out").model.layers[1]
    torch.testing.assert_close(saved.mlp.down_proj.weight.double(), B.T, rtol=1e-4, atol=1e-5)
