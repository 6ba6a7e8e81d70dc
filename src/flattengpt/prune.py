"""Pruning a wide (flattened) block back to the original width (METHOD.md section 4).

Heads: each query head i is scored by the token mean of ||o_i[t]||, o_i = A_i V_i W_O,i^T, its
contribution to the residual stream; whole KV groups are kept (group score = sum of its heads').

MLP channels (Nystrom with ridge leverage scores), with psi the m*I intermediate activations
(the input of down_proj) over the calibration tokens, C = psi^T psi and W = W_down^T:

    lambda = c * trace(C) / (m*I)
    s_j    = [C (C + lambda I)^-1]_jj = 1 - lambda [(C + lambda I)^-1]_jj   (C and its resolvent commute)
    keep the top-I channels S; fold the dropped ones into the kept rows of down_proj:
    B      = argmin_B ||R - psi_S B||^2 + lambda ||B - S^T W||^2
           = (S^T C S + lambda I)^-1 (S^T psi^T R + lambda S^T W)

R is the target the kept channels must reproduce: the flattened MLP output R = psi W (then
psi^T R = C W, the paper's formula), or the residual the group originally added, R = Y_orig - h
(Y_orig: the original blocks a..b run in sequence on the group's input; h: the residual after the
pruned attention, the MLP's input).
Derivation: the objective is convex in B; its gradient
    -2 psi_S^T (R - psi_S B) + 2 lambda (B - S^T W) = 0
    (psi_S^T psi_S + lambda I) B = psi_S^T R + lambda S^T W,     psi_S^T psi_S = S^T C S,
so only psi^T R (the "cross" sums) changes between the targets. At lambda = 0 the system can be
singular: the minimum-norm least-squares solution pinv(S^T C S) S^T psi^T R is used instead.

The optional o_proj refit is the same regression with the kept heads' attention outputs z_S (the
input of o_proj) as features and the full flattened attention output z W_O^T as target.

Everything is accumulated over token batches in float64 (psi^T psi, psi^T R, ||R||^2), so the
calibration activations are never held at once, and the fit errors come from the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .adapters import BlockShape, ModelAdapter
from .flatten import names

Batches = Iterable[tuple[torch.Tensor, dict]]  # (block input x, the block's forward kwargs)


# ----------------------------------------------------------------------------- activations


class _Stop(Exception):
    """Raised by a hook to cut a block's forward short once the wanted input was seen."""


@torch.no_grad()
def capture_inputs(layer: nn.Module, modules: list[str], x: torch.Tensor, kwargs: dict,
                   stop_at: str | None = None) -> dict[str, torch.Tensor]:
    """Run `layer` on x and return the input of each named submodule; stop once `stop_at` is reached."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, kw):
            seen[name] = args[0] if args else next(iter(kw.values()))
            if name == stop_at:
                raise _Stop
        return fn

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True) for name in modules]
    try:
        layer(x, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@dataclass
class Gram:
    """Running float64 sums over calibration tokens: C = F^T F, cross = F^T R, norm2 = ||R||^2."""

    C: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    norm2: float = 0.0
    tokens: int = 0

    def add(self, features: torch.Tensor, target: torch.Tensor | None = None) -> None:
        f = features.reshape(-1, features.shape[-1]).double()
        self.C = f.T @ f if self.C is None else self.C.addmm_(f.T, f)
        if target is not None:
            r = target.reshape(-1, target.shape[-1]).double()
            self.cross = f.T @ r if self.cross is None else self.cross.addmm_(f.T, r)
            self.norm2 += float((r * r).sum())
        self.tokens += f.shape[0]

    def check_finite(self, what: str) -> None:
        for t in (self.C, self.cross):
            if t is not None and not torch.isfinite(t).all():
                raise FloatingPointError(f"non-finite activations in {what}")
        if not torch.isfinite(torch.tensor(self.norm2)):
            raise FloatingPointError(f"non-finite activations in {what}")


def head_output_norms(z: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum over tokens of ||z_i W_O,i^T|| for every head i; z is o_proj's input [..., heads * head_dim]."""
    z = z.reshape(-1, z.shape[-1])
    num_heads = z.shape[-1] // head_dim
    sums = torch.empty(num_heads, dtype=torch.float64)
    for i in range(num_heads):  # one head at a time: tokens x hidden per head, never tokens x heads x hidden
        cols = slice(i * head_dim, (i + 1) * head_dim)
        sums[i] = (z[:, cols].float() @ o_weight[:, cols].float().T).norm(dim=-1).double().sum().cpu()
    return sums


@torch.no_grad()
def attention_statistics(layer: nn.Module, adapter: ModelAdapter, shape: BlockShape,
                         batches: Batches) -> tuple[torch.Tensor, Gram]:
    """Per-query-head scores (token-mean ||A_i V_i W_O,i^T||) and the Gram sums of o_proj's input z."""
    o = names(adapter)["o"]
    o_weight = layer.get_submodule(o).weight
    sums, gram = torch.zeros(shape.num_heads, dtype=torch.float64), Gram()
    for x, kwargs in batches:
        z = capture_inputs(layer, [o], x, kwargs, stop_at=o)[o]
        sums += head_output_norms(z, o_weight, shape.head_dim)
        gram.add(z)
    gram.check_finite("the attention heads")
    return sums / gram.tokens, gram


@torch.no_grad()
def mlp_statistics(layer: nn.Module, adapter: ModelAdapter, batches: Batches,
                   target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Gram:
    """Gram sums of psi (down_proj's input); with `target(x, h)`, also of the regression target R.

    h is the residual after the block's attention (the input of its MLP norm).
    """
    n = names(adapter)
    gram = Gram()
    for x, kwargs in batches:
        seen = capture_inputs(layer, [n["norm2"], n["down"]], x, kwargs, stop_at=n["down"])
        gram.add(seen[n["down"]], None if target is None else target(x, seen[n["norm2"]]))
    gram.check_finite("the MLP channels")
    return gram


# ----------------------------------------------------------------------------- selection


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: lower index first), in ascending index order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def select_kv_groups(head_scores: torch.Tensor, kv_group_size: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` KV groups with the largest summed query-head scores: (KV heads, query heads).

    Query head j belongs to KV head j // kv_group_size (Hugging Face's repeat_kv order).
    """
    group_scores = head_scores.reshape(-1, kv_group_size).sum(dim=1)
    kept_kv = top_k_in_order(group_scores, keep)
    kept_heads = (kept_kv[:, None] * kv_group_size + torch.arange(kv_group_size)).flatten()
    return kept_kv, kept_heads


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Indices along the heads * head_dim axis of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# ----------------------------------------------------------------------------- ridge regression


def ridge_lambda(C: torch.Tensor, factor: float) -> float:
    """lambda = c * trace(C) / n: c times the mean eigenvalue of C."""
    return float(factor) * float(torch.trace(C)) / C.shape[0]


def _pinv(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(A, hermitian=True, rtol=A.shape[0] * torch.finfo(A.dtype).eps * 10)


def _plus_ridge(A: torch.Tensor, lam: float) -> torch.Tensor:
    """A + lambda I without materialising I (C is (m*I)^2 float64: gigabytes for a 7B model)."""
    out = A.clone()
    out.diagonal().add_(lam)
    return out


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"the {A.shape[0]}x{A.shape[0]} ridge system is not positive definite "
                                       "(lambda too small for the precision?); try a larger lambda_factor or 0")
    return factor


def leverage_scores(C: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge leverage scores s_j = [C (C + lambda I)^-1]_jj (at lambda = 0: of the projection onto range(C))."""
    if lam > 0:
        return 1 - lam * torch.cholesky_inverse(_cholesky(_plus_ridge(C, lam))).diagonal()
    return (C @ _pinv(C)).diagonal()


def compensate(C: torch.Tensor, cross: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """B = (S^T C S + lambda I)^-1 (S^T cross + lambda S^T W); least squares (min norm) at lambda = 0."""
    C_SS = C[keep][:, keep]
    rhs = cross[keep] + lam * W[keep]
    if lam > 0:
        return torch.cholesky_solve(rhs, _cholesky(_plus_ridge(C_SS, lam)))
    return _pinv(C_SS) @ rhs


def fit_error(C: torch.Tensor, cross: torch.Tensor, norm2: float, keep: torch.Tensor, B: torch.Tensor) -> float:
    """||R - psi_S B||^2 = ||R||^2 - 2 <B, S^T psi^T R> + <B, S^T C S B>, from the accumulated sums."""
    C_SS = C[keep][:, keep]
    err = norm2 - 2 * float((B * cross[keep]).sum()) + float((B * (C_SS @ B)).sum())
    return max(err, 0.0)  # cancellation can leave a tiny negative number


@dataclass
class RidgeFit:
    """A selection S with its compensated weights and the calibration errors before and after."""

    keep: torch.Tensor
    weight: torch.Tensor  # B: the compensated rows of the kept features
    plain_weight: torch.Tensor  # S^T W: the kept rows as they were
    lam: float
    norm2: float  # ||R||^2
    error_plain: float  # ||R - psi_S S^T W||^2: selection alone
    error_compensated: float  # ||R - psi_S B||^2

    def against(self, C: torch.Tensor, cross: torch.Tensor, norm2: float) -> RidgeFit:
        """The same selection and weights, with the errors measured against another target."""
        return RidgeFit(self.keep, self.weight, self.plain_weight, self.lam, norm2,
                        fit_error(C, cross, norm2, self.keep, self.plain_weight),
                        fit_error(C, cross, norm2, self.keep, self.weight))

    def summary(self, tokens: int) -> dict:
        """Squared errors summed over tokens, and relative errors ||R - R_hat|| / ||R||."""
        def relative(err: float) -> float:
            return (err / self.norm2) ** 0.5 if self.norm2 > 0 else 0.0

        return {
            "lambda": self.lam,
            "target_rms": (self.norm2 / max(tokens, 1)) ** 0.5,
            "error_plain": self.error_plain,
            "error_compensated": self.error_compensated,
            "rel_error_plain": relative(self.error_plain),
            "rel_error_compensated": relative(self.error_compensated),
        }


def ridge_fit(C: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, lam: float,
              cross: torch.Tensor | None = None, norm2: float | None = None) -> RidgeFit:
    """Compensated weights for the kept features; target psi W unless `cross`/`norm2` give another."""
    if cross is None:
        CW = C @ W
        cross, norm2 = CW, float((W * CW).sum())
    B = compensate(C, cross, W, keep, lam)
    if not torch.isfinite(B).all():
        raise FloatingPointError("the compensation solve returned non-finite weights")
    W_S = W[keep]
    return RidgeFit(keep, B, W_S, lam, norm2,
                    fit_error(C, cross, norm2, keep, W_S), fit_error(C, cross, norm2, keep, B))


# ----------------------------------------------------------------------------- slicing the block


def prune_heads(block: dict[str, torch.Tensor], adapter: ModelAdapter, kept_kv: torch.Tensor, kept_heads: torch.Tensor,
                head_dim: int, o_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Keep the given query heads and KV heads (q/k/v rows with biases, o_proj columns).

    `o_weight` replaces the sliced o_proj weight (the refit), shape hidden x kept heads * head_dim.
    """
    n = names(adapter)
    q_rows, kv_rows = head_columns(kept_heads, head_dim), head_columns(kept_kv, head_dim)
    out = dict(block)
    for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        for kind in ("weight", "bias"):
            name = f"{n[role]}.{kind}"
            if name in block:
                out[name] = block[name][rows].clone()
    o = f"{n['o']}.weight"
    out[o] = block[o][:, q_rows].clone() if o_weight is None else o_weight.to(block[o].dtype)
    return out


def prune_channels(block: dict[str, torch.Tensor], adapter: ModelAdapter, keep: torch.Tensor,
                   down_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep the given MLP channels (gate/up rows) with the compensated down_proj (hidden x kept)."""
    n = names(adapter)
    out = dict(block)
    for role in ("gate", "up"):
        out[f"{n[role]}.weight"] = block[f"{n[role]}.weight"][keep].clone()
    down = f"{n['down']}.weight"
    out[down] = down_weight.to(block[down].dtype).contiguous()
    return out
