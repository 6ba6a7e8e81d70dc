"""FlattenGPT (METHOD.md sections 2-4): flatten each planned group into one wide block, prune it back.

Choice (plan rule, from the cosine view): the greedy flattening plan of plan.py, or a plan file.
Build, layer by layer from the bottom on calibration hidden states propagated through the layers
already compressed: a kept block is copied bit for bit; a group a..c is flattened (its attentions
and MLPs side by side on the same normalized input, flatten.py) and pruned to the original widths
(prune.py): the KV groups with the largest summed head output norms, then the MLP channels with the
largest ridge leverage scores of C = psi^T psi, with down_proj refitted by
W_new = (S^T C S + lambda I)^-1 (S^T C W + lambda S^T W), lambda = lambda_factor * trace(C) / (m I),
where W is the flattened MLP's W_down^T (target "flattened") or the fit is against the residual
the original blocks add (target "original").

The same module holds the flattening plan's two ablations (drop, flatten-only), which share its
choice: `drop` keeps the first block of each group, `flatten-only` keeps the unpruned wide blocks
zero-padded to the widest group.

Peak memory of one flattened group (group_memory_bytes states it as a formula). With d = hidden,
n = m*I the wide MLP width, n_a = m*H*head_dim the wide attention width, P the parameters of one
block, w / s the bytes of the compute / stored dtype, B x T a calibration batch, N x T the
calibration set and b = prune.BLOCK:
    host:    2 N T d w                the group's input and output hidden states (kept on the host)
           + 3 m P s                  stored tensors, their norm-folded copies and the wide block (flatten_group);
                                      afterwards it bounds what stays: the wide block, the pruned attention and
                                      the previous group's output queued for its shard (m P s + P_attn s + P s)
           + 0.5 GiB                  interpreter, torch, libraries
    device:  max over the phases of
      heads:  n_a^2 8 + max(m P w + B T (d + 4 n_a + 4 m KV hd) w + B T^2 w + 128 MiB,   wide layer, activations
                            (2 n_a + 6 n_a / m) d 8 + 4 n_a b 8)                         the o_proj fit
      MLP:    n^2 8 + (P_attn + 3 d n) w [+ m P w, original target]                      Gram, pruned-attention layer
              + 3 B T n w + B T 4 d w + 128 MiB [+ n d 8 cross]                          activations (gate, up, psi)
      solve:  n^2 8 + (2 + [1]) n d 8 + 4 I d 8 + 4 n b 8             C in place; W, C W, [cross]; W_S, rhs, B, C_SS B
    The float64 copy of a feature batch inside Gram.add is capped at 2^24 values (128 MiB); the
    solve's scratch (4 n b 8) is the panel of the blocked Cholesky and the triangular solves.
    Gram.check_finite scans C in row chunks (isfinite on the whole of it would add |C| and three
    n^2 masks, 1.4 n^2 8, the former peak of the MLP phase). The stored tensors are views of the
    memory-mapped safetensors file: their pages count as RSS for as long as anything refers to them.
    lambda_factor auto keeps the held-out sequences' sums beside the fit part's (heads + n_a^2 8 + n_a d 8,
    MLP + n^2 8 [+ n d 8]) and scores the grid on the kept channels (solve + n^2 8 + 2 n d 8 + 6 I^2 8
    + 4 I d 8: the held-out C, C W for both parts, C_SS, its held-out part, their difference, eigh's
    eigenvectors and workspace, the rotated held-out sums).
    solve_device host moves the solve phase's memory to the host. At lambda_factor 0 the leverage
    scores use eigh (C, its eigenvectors and LAPACK's 2 n^2 workspace: +3 n^2 8) and the solve uses
    pinv (about 4 I^2 8). On a CPU run device and host are the same RAM, and where the compute
    dtype is the stored one the layers' weights are the host tensors themselves (not counted twice).
    Not counted: attention score matrices (B m H T^2) where a backend materialises them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters import BlockShape
from ..blockwise import BlockwiseModel
from ..flatten import build_block, check_block, flatten_group, names, pad_block, widen
from ..plan import Layer, Plan, make_plan
from ..prune import (BLOCK, LAMBDA_GRID, SOLVE_DTYPES, Gram, LambdaChoice, _dot, attention_statistics, choose_lambda,
                     head_columns, held_out_split, leverage_scores, mlp_statistics, prune_channels, prune_heads,
                     ridge_fit, ridge_lambda, select_channels, select_kv_groups, symmetric_kept, top_k_in_order)
from .base import Built, BuildContext, Method, MethodError, SimilarityViews

TARGETS = ("flattened", "original")
HEAD_SCORINGS = ("output_norm",)
SOLVE_DEVICES = ("auto", "host")
PLAN_CRITERIA = ("cosine", "span", "trial_error")
FLATTENING_CHOICE = ("max_group_size", "protect_first", "protect_last")  # read from the target


def _summary(t: torch.Tensor) -> dict:
    t = t.double()
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _per_block(indices: torch.Tensor, width: int, group: list[int]) -> dict[str, int]:
    """How many of the kept indices (along a width-per-block concatenated axis) came from each block."""
    counts = torch.bincount(indices // width, minlength=len(group))
    return {str(block): int(c) for block, c in zip(group, counts)}


def _cast(block: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    return {k: v.to(dtypes[k]) for k, v in block.items()}


def _check_finite(hidden: torch.Tensor, what: str) -> None:
    if not torch.isfinite(hidden).all():
        raise FloatingPointError(f"non-finite activations in {what}; try dtype float32 or check the checkpoint")


@torch.no_grad()
def compress_group(runner: BlockwiseModel, group: list[int], hidden: torch.Tensor, *, lambda_factor: float | str = 10.0,
                   compensation_target: str = "flattened", attn_compensation: bool = False, batch_size: int = 8,
                   save_dtypes: dict[str, torch.dtype] | None = None, keep_kv_heads: int | None = None,
                   keep_channels: int | None = None, solve_device: str = "auto",
                   solve_dtype: str = "float64", validation: dict | None = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Flatten `group` and prune it to `keep_kv_heads` KV groups and `keep_channels` MLP channels.

    `hidden` is the group's input over the calibration set. Returns the pruned block (cast to
    `save_dtypes`), its output on `hidden` (the next group's input) and statistics. The widths
    default to the original ones; other widths are for tests and experiments.
    A group of one block is returned as the source checkpoint stores it, bit for bit. A wider group
    is flattened from the stored tensors too (in their own precision, on the host), so the kept rows
    are never rounded through the compute dtype; only the activations are computed in it.
    solve_device "host" moves the Gram sums to CPU RAM for the solves; solve_dtype is the
    precision of the factorisations and triangular solves (the sums and error checks stay float64).
    lambda_factor "auto" picks the compensation's factor per group on held-out calibration sequences
    (`validation`: fraction, seed, grid, selection_lambda_factor; see prune.choose_lambda) and refits
    on all of them; the channels are then selected with the leverage scores at
    selection_lambda_factor, and the o_proj refit (when applied) gets its own validated factor.
    """
    adapter, device, dtype = runner.adapter, runner.device, runner.dtype
    shape, first, m = adapter.shape, group[0], len(group)
    n = names(adapter)
    solve_precision = SOLVE_DTYPES[solve_dtype]

    sources = [runner.checkpoint.tensors(adapter.layer_prefix(i)) for i in group]  # as stored, on the host
    save_dtypes = save_dtypes or {k: v.dtype for k, v in sources[0].items()}
    for block in sources:
        check_block(block, adapter, shape)
    del block  # the loop variable would keep the last source block alive through the whole group
    stats: dict = {"blocks": group}
    if m == 1:  # nothing to flatten: the block is kept as it is
        new_hidden = runner.run_block(runner.load_block(first), first, hidden, batch_size)
        _check_finite(new_hidden, "the block's output")
        return sources[0], new_hidden, {**stats, "flattened": False}

    auto = lambda_factor == "auto"
    if auto:
        validation = {**VALIDATION_DEFAULTS, **(validation or {})}
        fit_rows, held_rows = held_out_split(hidden.shape[0], validation["fraction"], validation["seed"])
        stats["lambda_validation"] = {"held_out_sequences": held_rows.tolist(), "fit_sequences": len(fit_rows),
                                      "fraction": validation["fraction"], "seed": validation["seed"]}

    def batches(rows: torch.Tensor | None = None):
        count = hidden.shape[0] if rows is None else len(rows)
        for start in range(0, count, batch_size):
            part = hidden[start:start + batch_size] if rows is None else hidden[rows[start:start + batch_size]]
            x = part.to(device, dtype)
            yield x, runner.block_kwargs(first, x)

    def solve_place(gram: Gram) -> Gram:  # where the solves run: the device the sums were made on, or the host
        if solve_device == "host":
            gram.C = gram.C.cpu()
            gram.cross = None if gram.cross is None else gram.cross.cpu()
        return gram

    wide_shape = widen(shape, m)
    keep_kv = keep_kv_heads or shape.num_kv_heads
    keep_channels = keep_channels or shape.intermediate_size
    wide = flatten_group(sources, adapter)
    del sources

    # 1. Heads: score on the wide block, keep the best KV groups (their query heads with them).
    layer = build_block(adapter, wide, first, wide_shape, device, dtype)
    if auto:  # the same sums, over the fit and the held-out sequences apart
        head_fit, attn_gram = attention_statistics(layer, adapter, wide_shape, batches(fit_rows))
        head_held, attn_held = attention_statistics(layer, adapter, wide_shape, batches(held_rows))
        head_scores = (head_fit * attn_gram.tokens + head_held * attn_held.tokens) / (attn_gram.tokens
                                                                                     + attn_held.tokens)
    else:
        head_scores, attn_gram = attention_statistics(layer, adapter, wide_shape, batches())
    del layer
    kept_kv, kept_heads = select_kv_groups(head_scores, shape.kv_group_size, keep_kv)
    attn_gram = solve_place(attn_gram)
    W_o = wide[f"{n['o']}.weight"].T.double().to(attn_gram.C.device)  # W = W_O^T: (heads * head_dim) x hidden
    cols = head_columns(kept_heads, shape.head_dim).to(W_o.device)
    attn_factor = lambda_factor
    if auto:
        attn_held = solve_place(attn_held)
        if attn_compensation:  # the refit's own factor, on the flattened attention output z W_O^T
            choice = _validated(attn_gram.C, attn_held.C, W_o, cols, None, validation["grid"])
            stats["lambda_validation"]["attention"] = choice.summary()
            attn_factor = choice.pick
        else:  # the refit is not applied: its statistics at the selection factor
            attn_factor = validation["selection_lambda_factor"]
        attn_gram.C.add_(attn_held.C)  # all sequences
        attn_gram.tokens += attn_held.tokens
        del attn_held
    attn_C, attn_gram.C = attn_gram.C, None  # its storage is reused by the solve
    attn_fit = ridge_fit(attn_C, W_o, cols, ridge_lambda(attn_C, attn_factor), overwrite=True,
                         dtype=solve_precision)
    del attn_C, W_o
    o_weight = attn_fit.weight.T if attn_compensation else None
    pruned = prune_heads(wide, adapter, kept_kv, kept_heads, shape.head_dim, o_weight)
    mid_shape = replace(wide_shape, num_heads=len(kept_heads), num_kv_heads=len(kept_kv))
    stats["heads"] = {
        "kept_kv_groups": kept_kv.tolist(), "kept_query_heads": kept_heads.tolist(),
        "kept_kv_groups_per_block": _per_block(kept_kv, shape.num_kv_heads, group),
        "head_scores": [round(float(s), 6) for s in head_scores], "head_scores_summary": _summary(head_scores),
        # the attention output error of head selection, and of the o_proj refit when it is used
        "attention_error": {**attn_fit.summary(attn_gram.tokens), "refit_applied": attn_compensation},
        "solve": attn_fit.solve,
    }
    del attn_gram, attn_fit

    # 2. MLP channels on the residual after the pruned attention.
    layer = build_block(adapter, pruned, first, mid_shape, device, dtype)
    target = None
    if compensation_target == "original":
        originals = [runner.load_block(i) for i in group]
        # y - h is a small difference of two large residuals: form it in float32 at least, whatever the compute dtype
        target_dtype = torch.promote_types(dtype, torch.float32)

        def target(x, h):  # the residual the original blocks a..b add to the same input, minus h
            y = x
            for index, block in zip(group, originals):
                y = block(y, **runner.block_kwargs(index, y))
                y = y[0] if isinstance(y, tuple) else y
            return y.to(target_dtype) - h.to(target_dtype)
    if auto:
        gram = solve_place(mlp_statistics(layer, adapter, batches(fit_rows), target))
        held = solve_place(mlp_statistics(layer, adapter, batches(held_rows), target))
    else:
        gram, held = solve_place(mlp_statistics(layer, adapter, batches(), target)), None
    del layer, target
    originals = None
    W = wide[f"{n['down']}.weight"].T.double().to(gram.C.device)  # W = W_down^T: (m*I) x hidden
    if auto:
        selection_factor = validation["selection_lambda_factor"]
        scores, fit, fit_flattened, choice = _validated_channels(gram, held, W, keep_channels, selection_factor,
                                                                validation["grid"], solve_precision)
        stats["lambda_validation"]["mlp"] = choice.summary()
        del held
    else:
        C, gram.C = gram.C, None  # select_channels factors C in its own storage
        lam = ridge_lambda(C, lambda_factor)
        norm2 = None if gram.cross is None else gram.norm2
        scores, fit, fit_flattened = select_channels(C, W, keep_channels, lam, gram.cross, norm2,
                                                     dtype=solve_precision)
        del C
    del W
    keep = fit.keep.cpu()
    stats["mlp"] = {
        "kept_channels": len(keep), "of_channels": wide_shape.intermediate_size,
        "kept_channels_per_block": _per_block(keep, shape.intermediate_size, group),
        "leverage_summary": _summary(scores), "target": compensation_target,
        "lambda_factor": stats["lambda_validation"]["mlp"]["pick"] if auto else lambda_factor,
        "selection_lambda_factor": validation["selection_lambda_factor"] if auto else lambda_factor,
        "error": fit.summary(gram.tokens), "solve": fit.solve,
    }
    if compensation_target == "original":  # the same selection and fit measured against the flattened MLP output
        stats["mlp"]["error_vs_flattened"] = fit_flattened.summary(gram.tokens)
    del gram

    final = _cast(prune_channels(pruned, adapter, keep, fit.weight.T.cpu()), save_dtypes)
    final_shape = replace(mid_shape, intermediate_size=len(keep))
    layer = build_block(adapter, final, first, final_shape, device, dtype)  # as it will be saved
    new_hidden = runner.run_block(layer, first, hidden, batch_size)
    _check_finite(new_hidden, "the compressed block's output")
    return final, new_hidden, {**stats, "flattened": True}


VALIDATION_DEFAULTS = {"fraction": 0.25, "seed": 0, "grid": list(LAMBDA_GRID), "selection_lambda_factor": 1.0}


def _validated(C_fit: torch.Tensor, C_held: torch.Tensor, W: torch.Tensor, keep: torch.Tensor,
               targets: tuple | None, grid) -> LambdaChoice:
    """The factor of the fit of `keep`'s rows toward S^T W, scored on the held-out sums.

    targets = (cross_fit, cross_held, norm2_held) of another target R; None: the target psi W itself
    (cross = C W, ||R||^2 = <W, C W>). The scale is the fit part's trace(C) / n, as ridge_lambda.
    """
    if targets is None:
        CW_held = C_held @ W
        cross_fit, cross_held, norm2_held = (C_fit @ W)[keep], CW_held[keep], _dot(W, CW_held)
        del CW_held
    else:
        cross_fit, cross_held, norm2_held = targets[0][keep], targets[1][keep], targets[2]
    scale = float(torch.trace(C_fit)) / C_fit.shape[0]
    return choose_lambda(C_fit[keep][:, keep], cross_fit, W[keep], C_held[keep][:, keep], cross_held, norm2_held,
                         grid, scale)


def _validated_channels(gram: Gram, held: Gram, W: torch.Tensor, keep_count: int, selection_factor: float, grid,
                        dtype: torch.dtype):
    """MLP channels under lambda_factor auto: (scores, fit, fit vs psi W, LambdaChoice).

    Channels: the top leverage scores of C_all at selection_factor. Then the compensation's factor
    is validated (fit part vs held-out part, restricted to the kept channels) and the fit redone on
    all sequences with it. Peak: C_fit (becoming C_all) and C_held, 2 n^2 float64, then a few I x I.
    """
    targets = None if gram.cross is None else (gram.cross, held.cross, held.norm2)
    C, held_C = gram.C, held.C
    gram.C = held.C = None
    n = C.shape[0]
    trace_fit = float(torch.trace(C))
    C.add_(held_C)  # C_all, in the fit part's storage
    diag = C.diagonal().clone()
    CW = C @ W
    flat_norm2 = _dot(W, CW)
    if targets is None:
        cross, norm2 = CW, flat_norm2
    else:
        cross, norm2 = gram.cross + held.cross, gram.norm2 + held.norm2
    scores = leverage_scores(C, ridge_lambda(C, selection_factor), overwrite=True, dtype=dtype)
    keep = top_k_in_order(scores, keep_count)
    C_SS = symmetric_kept(C, diag, keep)  # C_all restricted; C's lower triangle now holds a factor
    held_SS = held_C[keep][:, keep]
    if targets is None:
        CW_held = held_C @ W
        cross_fit, cross_held, norm2_held = (CW - CW_held)[keep], CW_held[keep], _dot(W, CW_held)
        del CW_held
    else:
        cross_fit, cross_held, norm2_held = targets[0][keep], targets[1][keep], targets[2]
    del held_C
    choice = choose_lambda(C_SS - held_SS, cross_fit, W[keep], held_SS, cross_held, norm2_held, grid,
                           trace_fit / n)
    del C_SS, held_SS, cross_fit, cross_held
    lam = choice.pick * float(diag.sum()) / n  # ridge_lambda of C_all
    fit = ridge_fit(C, W, keep, lam, cross, norm2, overwrite=True, diag=diag, dtype=dtype)
    gram.tokens += held.tokens
    return scores, fit, fit.against(CW, flat_norm2), choice


def group_memory_bytes(shape: BlockShape, group_size: int, *, compute_dtype_bytes: int, batch_size: int, seq_len: int,
                       compensation_target: str, solve_device: str, n_samples: int = 128,
                       source_dtype_bytes: int | None = None, lambda_factor: float | str = 10.0,
                       device: str = "cuda") -> dict[str, int]:
    """Peak bytes of compressing one group of `group_size` blocks of `shape`: {"device": .., "host": ..}.

    The formula of the module docstring, phase by phase; n_samples x seq_len is the calibration set
    (default the paper's 128 sequences). With device "cpu" everything is host memory ("device": 0).
    """
    m, w, b = group_size, compute_dtype_bytes, BLOCK
    s = compute_dtype_bytes if source_dtype_bytes is None else source_dtype_bytes
    d, hd, I = shape.hidden_size, shape.head_dim, shape.intermediate_size
    n, n_attn, kv = m * I, m * shape.num_heads * hd, m * shape.num_kv_heads * hd
    p_attn = 2 * d * shape.num_heads * hd + 2 * d * shape.num_kv_heads * hd  # q, o; k, v of one block
    p_block = p_attn + 3 * d * I + 2 * d
    original = compensation_target == "original"
    shared = device == "cpu" and w == s  # the layers are built from the host tensors without a copy
    tokens, chunk = batch_size * seq_len, 2**24 * 8
    layer_wide = 0 if shared else m * p_block * w
    heads = n_attn**2 * 8 + max(layer_wide + tokens * (d + 4 * n_attn + 4 * kv) * w + batch_size * seq_len**2 * w
                                + chunk,
                                (2 * n_attn + 6 * n_attn // m) * d * 8 + 4 * n_attn * b * 8)
    mlp = (n**2 * 8 + (0 if shared else (p_attn + 3 * d * n) * w) + (m * p_block * w if original else 0)
           + 3 * tokens * n * w + 4 * tokens * d * w + chunk + (n * d * 8 if original else 0))
    solve = n**2 * 8 + (3 if original else 2) * n * d * 8 + 4 * I * d * 8 + 4 * n * b * 8
    if lambda_factor == 0:
        solve += 3 * n**2 * 8 + 4 * I**2 * 8
    if lambda_factor == "auto":  # the held-out part's sums beside the fit part's; the grid on I x I matrices
        heads += n_attn**2 * 8 + n_attn * d * 8
        mlp += n**2 * 8 + (n * d * 8 if original else 0)
        solve += n**2 * 8 + 2 * n * d * 8 + 6 * I**2 * 8 + 4 * I * d * 8
    host = 2 * n_samples * seq_len * d * w + 3 * m * p_block * s + 2**29
    if device == "cpu":
        return {"device": 0, "host": host + max(heads, mlp, solve)}
    if solve_device == "host":
        return {"device": max(heads, mlp), "host": host + solve}
    return {"device": max(heads, mlp, solve), "host": host}


def _non_negative(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0


def check_validation_options(o: dict) -> None:
    """lambda_factor (a number >= 0 or "auto") and the options of "auto"; numbers made floats in place."""
    if o["lambda_factor"] != "auto":
        if not _non_negative(o["lambda_factor"]):
            raise MethodError(f"lambda_factor must be a number >= 0 or \"auto\", got {o['lambda_factor']!r}")
        o["lambda_factor"] = float(o["lambda_factor"])
    fraction = o["validation_fraction"]
    if not _non_negative(fraction) or not 0 < fraction < 1:
        raise MethodError(f"validation_fraction must be in (0, 1), got {fraction!r}")
    if isinstance(o["validation_seed"], bool) or not isinstance(o["validation_seed"], int):
        raise MethodError(f"validation_seed must be an integer, got {o['validation_seed']!r}")
    grid = o["lambda_grid"]
    if not isinstance(grid, list) or not grid or not all(_non_negative(c) for c in grid):
        raise MethodError(f"lambda_grid must be a non-empty list of numbers >= 0, got {grid!r}")
    o["lambda_grid"] = sorted(float(c) for c in grid)
    if "selection_lambda_factor" in o:
        if not _non_negative(o["selection_lambda_factor"]) or o["selection_lambda_factor"] == 0:
            raise MethodError(f"selection_lambda_factor must be a number > 0, got {o['selection_lambda_factor']!r}")
        o["selection_lambda_factor"] = float(o["selection_lambda_factor"])


def validation_settings(o: dict) -> dict:
    """The `validation` argument of compress_group from a method's options."""
    return {"fraction": o["validation_fraction"], "seed": o["validation_seed"], "grid": o["lambda_grid"],
            "selection_lambda_factor": o.get("selection_lambda_factor", 1.0)}


def flattening_plan(views: SimilarityViews, k: int | None, target: dict, span: bool = False) -> Plan:
    """The greedy flattening plan (or the target's plan_file) that flattengpt, drop and flatten-only share.

    k is the target's block count, resolved by the caller (a ratio needs the parameter counts). `span`:
    one group of k + 1 blocks instead (flattengpt's plan_criterion span).
    """
    options = {key: target.get(key) for key in FLATTENING_CHOICE}
    if span and target.get("plan_file"):
        raise MethodError("plan_criterion span chooses the group itself; a target with plan_file needs "
                          "plan_criterion cosine")
    resolved = dict(target) if target.get("plan_file") else {"remove_blocks": k, **options}
    return make_plan(views.cosine, {"total": 1, "per_block": [1] * views.num_layers}, resolved, options, span=span)


class FlattenGPT(Method):
    name = "flattengpt"
    fits = True
    reads_plan_file = True
    summary = "flatten each planned group into one wide block and prune it back to the original width"
    OPTIONS = {"lambda_factor": 10.0, "compensation_target": "flattened", "attn_compensation": False,
               "head_scoring": "output_norm", "solve_device": "auto", "solve_dtype": "float64",
               # lambda_factor auto: what is held out, the grid, and the leverage scores' factor
               "validation_fraction": VALIDATION_DEFAULTS["fraction"], "validation_seed": VALIDATION_DEFAULTS["seed"],
               "lambda_grid": list(LAMBDA_GRID),
               "selection_lambda_factor": VALIDATION_DEFAULTS["selection_lambda_factor"],
               # cosine: the paper's greedy plan on input similarity (plan rule); span: one group of k + 1
               # blocks of the most similar first and last input (plan rule); trial_error: the pairs whose
               # trial compression leaves the least held-out error (search rule, methods/trial_plan.py)
               "plan_criterion": "cosine"}
    CHOICE_OPTIONS = ("plan_criterion",)  # and the target's options (max_group_size, protections, plan_file)

    @classmethod
    def choice_source(cls, options: dict) -> str:
        return "model" if options.get("plan_criterion") == "trial_error" else "similarity"

    @classmethod
    def choice_options(cls, options: dict) -> dict:
        if options.get("plan_criterion") == "trial_error":  # the trial compressions use every fit option
            return {k: v for k, v in options.items() if k in cls.OPTIONS}
        return super().choice_options(options)

    def check_options(self) -> None:
        o = self.options
        for name, allowed in (("compensation_target", TARGETS), ("head_scoring", HEAD_SCORINGS),
                              ("solve_device", SOLVE_DEVICES), ("solve_dtype", tuple(SOLVE_DTYPES))):
            if o[name] not in allowed:
                raise MethodError(f"{name} {o[name]!r} is not one of {', '.join(allowed)}")
        check_validation_options(o)
        if o["plan_criterion"] not in PLAN_CRITERIA:
            raise MethodError(f"plan_criterion {o['plan_criterion']!r} is not one of {', '.join(PLAN_CRITERIA)}")
        if o["solve_dtype"] == "float32" and o["lambda_factor"] == 0:
            # without the ridge the systems can be singular: float32 has no margin for that
            raise MethodError("solve_dtype float32 needs lambda_factor > 0 (the least-squares solve at lambda 0 "
                              "can be singular); set solve_dtype: float64 or lambda_factor > 0")

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        if self.options["plan_criterion"] == "trial_error":
            if search is None:
                raise MethodError("plan_criterion trial_error chooses from the model and the calibration tokens "
                                  "(the search rule)")
            from .trial_plan import trial_plan

            return trial_plan(self, k, search, target)
        plan = flattening_plan(views, k, target or {"remove_blocks": k}, span=self.options["plan_criterion"] == "span")
        plan.method = self.name
        return plan

    def build(self, ctx: BuildContext, layer: Layer, hidden) -> Built:
        if layer.op not in ("keep", "flatten"):
            raise MethodError(f"flattengpt builds keep and flatten layers, not {layer.op!r}")
        _check_finite(hidden, "the group's input")
        o = self.options
        block, new_hidden, stats = compress_group(
            ctx.runner, layer.blocks, hidden, lambda_factor=o["lambda_factor"],
            compensation_target=o["compensation_target"], attn_compensation=o["attn_compensation"],
            batch_size=ctx.batch_size, save_dtypes=ctx.save_dtypes(layer.base), solve_device=o["solve_device"],
            solve_dtype=o["solve_dtype"], validation=validation_settings(o))
        return Built(block, {"op": layer.op, **stats}, hidden_out=new_hidden)


class Drop(Method):
    name = "drop"
    reads_plan_file = True
    summary = "the flattening plan's naive ablation: keep the first block of each group, delete the others"

    def plan_from_partition(self, num_layers: int, groups: list[list[int]]) -> Plan:
        return Plan.from_kept(num_layers, [group[0] for group in groups], method=self.name,
                              options={"groups": groups})

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        flat = flattening_plan(views, k, target or {"remove_blocks": k})
        return Plan.from_kept(flat.num_layers, flat.kept_blocks, method=self.name, steps=flat.steps,
                              target=flat.target, options={**flat.options, "groups": flat.groups})


class FlattenOnly(Method):
    name = "flatten-only"
    reads_plan_file = True
    summary = "the flattening plan's unpruned wide blocks, zero-padded to the widest group"

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        plan = flattening_plan(views, k, target or {"remove_blocks": k})
        plan.method = self.name
        return plan

    def output_shape(self, adapter, plan: Plan):
        widest = widen(adapter.shape, max(len(layer.blocks) for layer in plan.layers))
        return adapter.config_width(widest)  # more zero heads where the config class demands it

    def build(self, ctx: BuildContext, layer: Layer, hidden) -> Built:
        adapter, shape = ctx.runner.adapter, ctx.runner.adapter.shape
        sources = [ctx.source_tensors(i) for i in layer.blocks]  # as stored: exact copies, padding
        for block in sources:
            check_block(block, adapter, shape)
        wide = sources[0] if len(sources) == 1 else flatten_group(sources, adapter)
        tensors = _cast(pad_block(wide, adapter, widen(shape, len(sources)), ctx.output_shape),
                        ctx.save_dtypes(layer.base))
        return Built(tensors, {"op": layer.op, "blocks": layer.blocks}, shape=ctx.output_shape)


def errors_line(stats: dict) -> str:
    """The relative calibration errors of a flattened group, for the log."""
    if not stats.get("flattened"):
        return ""
    attn, mlp = stats["heads"]["attention_error"], stats["mlp"]["error"]
    attn_line = f"{attn['rel_error_plain']:.3f}"
    if attn["refit_applied"]:
        attn_line += f" -> {attn['rel_error_compensated']:.3f}"
    mlp_line = f"{mlp['rel_error_plain']:.3f} -> {mlp['rel_error_compensated']:.3f}"
    validation = stats.get("lambda_validation", {})
    if "mlp" in validation:  # lambda_factor auto: the pick and its held-out error
        curve = validation["mlp"]
        mlp_line += (f" (lambda_factor {curve['pick']:g} picked on {len(validation['held_out_sequences'])} held-out "
                     f"sequences: rel. error {curve['held_out_rel_error'][curve['pick_index']]:.3f})")
    return f"; relative error attention {attn_line}, MLP {mlp_line}"
