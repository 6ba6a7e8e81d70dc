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

from dataclasses import dataclass, replace
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

    chunk_elements: int = 2**24  # float64 copies of at most this many feature values (128 MiB) at a time

    def add(self, features: torch.Tensor, target: torch.Tensor | None = None) -> None:
        features = features.reshape(-1, features.shape[-1])
        target = None if target is None else target.reshape(-1, target.shape[-1])
        rows = max(1, self.chunk_elements // features.shape[1])  # a whole batch in float64 would be B*T*n*8 bytes
        for start in range(0, features.shape[0], rows):
            f = features[start:start + rows].double()
            self.C = f.T @ f if self.C is None else self.C.addmm_(f.T, f)
            if target is not None:
                r = target[start:start + rows].double()
                self.cross = f.T @ r if self.cross is None else self.cross.addmm_(f.T, r)
                self.norm2 += float((r * r).sum())
        self.tokens += features.shape[0]

    def check_finite(self, what: str) -> None:
        for t in (self.C, self.cross):
            if t is not None and not all_finite(t):
                raise FloatingPointError(f"non-finite activations in {what}")
        if not torch.isfinite(torch.tensor(self.norm2)):
            raise FloatingPointError(f"non-finite activations in {what}")


def all_finite(t: torch.Tensor, chunk_elements: int = 2**22) -> bool:
    """torch.isfinite(t).all(), a few rows at a time.

    On the whole of an n x n Gram matrix, isfinite makes |C| (another n^2 float64) and three n^2
    bool masks: 1.4 n^2 8 bytes on top of C, the peak of the MLP phase. In row chunks of at most
    `chunk_elements` values the scratch is 44 MiB.
    """
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, chunk_elements // max(rows.shape[1], 1))
    return all(bool(torch.isfinite(rows[i:i + step]).all()) for i in range(0, rows.shape[0], step))


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

BLOCK = 512  # columns per step of the blocked factorisation and solves: the scratch is O(n * BLOCK)
SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def ridge_lambda(C: torch.Tensor, factor: float) -> float:
    """lambda = c * trace(C) / n: c times the mean eigenvalue of C."""
    return float(factor) * float(torch.trace(C)) / C.shape[0]


def _pinv(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(A, hermitian=True, rtol=A.shape[0] * torch.finfo(A.dtype).eps * 10)


def _lower(A: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """The lower triangle of the diagonal block A[rows, rows] as a fresh tensor (its upper part is not L)."""
    return A[rows, rows].tril().to(dtype)


def cholesky_lower_(A: torch.Tensor, lam: float, *, block: int = BLOCK, dtype: torch.dtype = torch.float64) -> None:
    """Factor A + lam I = L L^T in place: L goes into the lower triangle of A, diagonal included.

    Left-looking and blocked: block column j is updated with the finished columns left of it,
        A[j:, J] -= L[j:, :j] L[J, :j]^T,   L[J, J] = chol(A[J, J]),   L[e:, J] = A[e:, J] L[J, J]^-T,
    so only the lower triangle is read and the strict upper triangle is never written: when A held a
    symmetric C, it still holds C there afterwards (with diag(C) lost). Scratch: a panel of
    n x block and row chunks of block x n. `dtype` is the arithmetic precision; storage stays A's.
    """
    n = A.shape[0]
    rows_chunk = 4 * block  # rows of L[j:, :j] cast to `dtype` at a time, so that the cast is O(n * block)
    for j in range(0, n, block):
        e = min(j + block, n)
        panel = A[j:, j:e].to(dtype, copy=True)
        if j:
            top = A[j:e, :j].to(dtype).T
            for r in range(j, n, rows_chunk):
                panel[r - j:r - j + rows_chunk] -= A[r:r + rows_chunk, :j].to(dtype) @ top
        diagonal = panel[:e - j].tril()
        diagonal = diagonal + diagonal.tril(-1).T  # its upper part still holds C, not the update: mirror the lower
        diagonal.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(diagonal)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(
                f"the {n}x{n} ridge system is not positive definite at column {j + int(info) - 1} "
                f"(lambda {lam:.3g} too small for {str(dtype).removeprefix('torch.')}?); "
                "raise lambda_factor, use solve_dtype float64, or lambda_factor 0 (least squares)")
        if e < n:  # X L_JJ^T = panel below the diagonal block
            A[e:, j:e] = torch.linalg.solve_triangular(factor.T, panel[e - j:], upper=True, left=False).to(A.dtype)
        square = A[j:e, j:e]
        square.copy_(torch.where(torch.ones_like(square, dtype=torch.bool).tril(), factor.to(A.dtype), square))


def _forward_(L: torch.Tensor, Y: torch.Tensor, start: int, block: int) -> None:
    """Y <- L[start:, start:]^-1 Y in place, L the lower triangle of `L` (Y: (n - start) x k)."""
    n = L.shape[0]
    for k in range(start, n, block):
        e = min(k + block, n)
        rows = Y[k - start:e - start]
        if k > start:
            rows -= L[k:e, start:k].to(Y.dtype) @ Y[:k - start]
        Y[k - start:e - start] = torch.linalg.solve_triangular(_lower(L, slice(k, e), Y.dtype), rows, upper=False)


def _backward_(L: torch.Tensor, Y: torch.Tensor, block: int) -> None:
    """Y <- L^-T Y in place, L the lower triangle of `L`."""
    n = L.shape[0]
    for k in reversed(range(0, n, block)):
        e = min(k + block, n)
        rows = Y[k:e]
        if e < n:
            rows -= L[e:, k:e].to(Y.dtype).T @ Y[e:]
        Y[k:e] = torch.linalg.solve_triangular(_lower(L, slice(k, e), Y.dtype).T, rows, upper=True)


def cholesky_solve_lower(L: torch.Tensor, rhs: torch.Tensor, *, block: int = BLOCK,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(L L^T)^-1 rhs in float64, L the lower triangle of `L` (its strict upper part is ignored)."""
    Y = rhs.to(dtype, copy=True)
    _forward_(L, Y, 0, block)
    _backward_(L, Y, block)
    return Y.double()


def inverse_diagonal(L: torch.Tensor, *, block: int = BLOCK, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag((L L^T)^-1)_i = ||L^-1 e_i||^2, L the lower triangle of `L`, one block of columns at a time.

    Column i of L^-1 is zero above row i, so block J needs only the trailing solve L[j:, j:] X = E_J.
    """
    n = L.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=L.device)
    for j in range(0, n, block):
        e = min(j + block, n)
        X = torch.zeros(n - j, e - j, dtype=dtype, device=L.device)
        X.diagonal().fill_(1)
        _forward_(L, X, j, block)
        out[j:e] = X.double().pow(2).sum(0)
    return out


def leverage_scores(C: torch.Tensor, lam: float, *, overwrite: bool = False, block: int = BLOCK,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Ridge leverage scores s_j = [C (C + lambda I)^-1]_jj (at lambda = 0: of the projection onto range(C)).

    s = 1 - lambda diag((C + lambda I)^-1). With `overwrite`, the Cholesky factor is written into
    C's lower triangle (diagonal included) and C's strict upper triangle is kept: the peak is C
    itself plus O(n * block). Without, C is copied first.
    At lambda = 0 the scores are diag(V_r V_r^T) over the eigenvectors of the non-negligible
    eigenvalues: eigh needs C, its eigenvectors and LAPACK's workspace, about 4 n^2 float64 (C is
    left intact either way).
    """
    if lam > 0:
        A = C if overwrite else C.clone()
        cholesky_lower_(A, lam, block=block, dtype=dtype)
        return 1 - lam * inverse_diagonal(A, block=block, dtype=dtype)
    values, vectors = torch.linalg.eigh(C)
    kept = values > C.shape[0] * torch.finfo(C.dtype).eps * 10 * values.abs().max()  # pinv's cut-off
    return vectors[:, kept].pow(2).sum(1)


def kept_gram_(A: torch.Tensor, diag: torch.Tensor, keep: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """C_SS = C[keep][:, keep], built in place at the start of A's storage; returns that I x I view.

    Reads only A's strict upper triangle (which must hold C) and `diag` = diag(C), so A's lower
    triangle may hold a factor. Why in place is safe: row block a0..a1 of C_SS is gathered before it
    is written over flat positions [a0 I, a1 I), and every row of C still to be read, keep[a] >= a >= a1,
    starts its upper part beyond a1 n >= a1 I; its lower part, C_SS[a, b < a0] = C_SS[b, a], is
    taken from the rows already written.
    """
    n, size = A.shape[0], len(keep)
    if not A.is_contiguous():
        raise ValueError("kept_gram_ needs a contiguous matrix")
    keep = keep.to(A.device)
    out = A.view(-1)[: size * size].view(size, size)
    for a0 in range(0, size, block):
        a1 = min(a0 + block, size)
        rows = A[keep[a0:a1]][:, keep]  # valid where column keep[b] > keep[a], i.e. b > a
        sub = rows[:, a0:a1].triu(1)
        sub = sub + sub.T
        sub.diagonal().copy_(diag[keep[a0:a1]])
        rows[:, a0:a1] = sub
        rows[:, :a0] = out[:a0, a0:a1].T
        out[a0:a1] = rows
    return out


def spare_storage(A: torch.Tensor, used: int, size: int) -> torch.Tensor | None:
    """An I x I view of A's storage after its first `used` elements, if A is large enough (else None)."""
    flat = A.view(-1)
    if flat.numel() < used + size * size:
        return None
    return flat[used:used + size * size].view(size, size)


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"the {A.shape[0]}x{A.shape[0]} ridge system is not positive definite "
                                       "(lambda too small for the precision?); try a larger lambda_factor or 0")
    return factor


def compensate(C: torch.Tensor, cross: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """B = (S^T C S + lambda I)^-1 (S^T cross + lambda S^T W); least squares (min norm) at lambda = 0.

    The plain dense formula (several I x I copies): ridge_fit is the memory-frugal path; tests hold
    both to it.
    """
    C_SS = C[keep][:, keep]
    rhs = cross[keep] + lam * W[keep]
    if lam > 0:
        A = C_SS.clone()
        A.diagonal().add_(lam)
        return torch.cholesky_solve(rhs, _cholesky(A))
    return _pinv(C_SS) @ rhs


def fit_error(C: torch.Tensor, cross: torch.Tensor, norm2: float, keep: torch.Tensor, B: torch.Tensor) -> float:
    """||R - psi_S B||^2 = ||R||^2 - 2 <B, S^T psi^T R> + <B, S^T C S B>, from the accumulated sums."""
    C_SS = C[keep][:, keep]
    err = norm2 - 2 * float((B * cross[keep]).sum()) + float((B * (C_SS @ B)).sum())
    return max(err, 0.0)  # cancellation can leave a tiny negative number


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> without an elementwise product the size of a."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


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
    quadratic: tuple[float, float] = (0.0, 0.0)  # <W_S, C_SS W_S>, <B, C_SS B>: the target-free terms
    solve: dict | None = None  # precision of the solve: dtype, relative residual, condition bound

    def against(self, cross: torch.Tensor, norm2: float) -> RidgeFit:
        """The same selection and weights, with the errors measured against another target (cross = psi^T R)."""
        cross_S = cross[self.keep.to(cross.device)]
        plain, compensated = (max(norm2 - 2 * _dot(w, cross_S) + q, 0.0)
                              for w, q in zip((self.plain_weight, self.weight), self.quadratic))
        return replace(self, norm2=norm2, error_plain=plain, error_compensated=compensated)

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
              cross: torch.Tensor | None = None, norm2: float | None = None, *, overwrite: bool = False,
              diag: torch.Tensor | None = None, block: int = BLOCK, dtype: torch.dtype = torch.float64) -> RidgeFit:
    """Compensated weights for the kept features; target psi W unless `cross`/`norm2` give another.

    With `overwrite`, C's storage is reused: C_SS is gathered into its start (kept_gram_, reading
    only C's strict upper triangle and `diag`, default diag(C)) and the factor of C_SS + lambda I goes
    into the storage after it, so nothing of n^2 size is allocated. C is garbage afterwards.
    `dtype` is the precision of the factorisation and the triangular solves; the errors and the
    residual check are always float64. At lambda = 0 the min-norm least-squares solution uses pinv
    (an eigendecomposition of C_SS: several I x I matrices).
    """
    if cross is None:
        if diag is not None:
            raise ValueError("ridge_fit: with a factored C (diag given), pass cross = C W computed before factoring")
        CW = C @ W
        cross, norm2 = CW, float((W * CW).sum())
    keep = keep.to(C.device)
    if overwrite:
        C_SS = kept_gram_(C, C.diagonal().clone() if diag is None else diag, keep, block=block)
    else:
        C_SS = C[keep][:, keep]
    W_S = W[keep]
    rhs = cross[keep].add_(W_S, alpha=lam)  # I x hidden each: at 7B width these are not small, so few of them
    solve = {"dtype": str(dtype).removeprefix("torch.")}
    if lam > 0:
        size = len(keep)
        L = spare_storage(C, size * size, size) if overwrite else None
        L = torch.empty_like(C_SS) if L is None else L
        L.copy_(C_SS)
        cholesky_lower_(L, lam, block=block, dtype=dtype)
        B = cholesky_solve_lower(L, rhs, block=block, dtype=dtype)
        del L
        # a posteriori: ||B - B*|| / ||B*|| <= kappa ||r|| / ||rhs||, and the eigenvalues of C_SS + lambda I
        # lie in [lambda, trace(C_SS) + lambda], so kappa <= 1 + trace(C_SS) / lambda (<= 1 + n / lambda_factor)
        solve["condition_bound"] = 1 + float(torch.trace(C_SS)) / lam
    else:
        B = _pinv(C_SS) @ rhs
        solve["condition_bound"] = None
    if not torch.isfinite(B).all():
        raise FloatingPointError("the compensation solve returned non-finite weights")
    CB = C_SS @ B
    quadratic_B = _dot(B, CB)
    rhs_norm = float(rhs.norm())
    solve["relative_residual"] = float(CB.add_(B, alpha=lam).sub_(rhs).norm()) / rhs_norm if rhs_norm > 0 else 0.0
    if solve["condition_bound"] is not None:
        solve["forward_error_bound"] = solve["condition_bound"] * solve["relative_residual"]
    del CB, rhs
    quadratic = (_dot(W_S, C_SS @ W_S), quadratic_B)
    del C_SS
    fit = RidgeFit(keep, B, W_S, lam, norm2, 0.0, 0.0, quadratic, solve)
    return fit.against(cross, norm2)


def select_channels(C: torch.Tensor, W: torch.Tensor, keep_count: int, lam: float,
                    cross: torch.Tensor | None = None, norm2: float | None = None, *, block: int = BLOCK,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, RidgeFit, RidgeFit]:
    """The MLP-channel step on C's own storage: (leverage scores, fit to the target, the fit vs psi W).

    Everything that needs the whole of C (C W, diag(C)) is taken before C's lower triangle becomes
    the factor; then C_SS is rebuilt from the strict upper triangle. Peak: C (n^2 float64) plus
    O(n * block + n * hidden). C is garbage afterwards.
    """
    diag = C.diagonal().clone()
    CW = C @ W
    flat_norm2 = float((W * CW).sum())
    if cross is None:
        cross, norm2 = CW, flat_norm2
    scores = leverage_scores(C, lam, overwrite=True, block=block, dtype=dtype)
    keep = top_k_in_order(scores, keep_count)
    fit = ridge_fit(C, W, keep, lam, cross, norm2, overwrite=True, diag=diag, block=block, dtype=dtype)
    return scores, fit, fit.against(CW, flat_norm2)


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


# ----------------------------------------------------------------------------- lambda by validation
#
# lambda_factor "auto": the calibration sequences are split (by sequence, seeded) into a fit part and
# a held-out part, with sums accumulated for each. For a grid of factors c, lambda = c * trace(C_fit)/n
# (the same scale as ridge_lambda, on the fit part's sums) and
#     B(lambda) = (C_fit + lambda I)^-1 (cross_fit + lambda P)                (P: the prior, S^T W or I)
# is scored by its held-out error ||R_v - F_v B||^2 = ||R_v||^2 - 2 <B, cross_v> + <B, C_v B>.
# One eigendecomposition C_fit = V diag(e) V^T gives every grid point: in V's basis
#     X(lambda) = V^T B = (V^T cross_fit + lambda V^T P) / (e + lambda)     (row-wise)
#     error     = ||R_v||^2 - 2 <X, V^T cross_v> + <X, (V^T C_v V) X>
# so a grid point costs one (n x n)(n x d) product, not a factorisation. At lambda = 0 the
# min-norm least squares (pinv) is used, 1/e where e is above pinv's cut-off and 0 elsewhere.
# The factor with the lowest held-out error (the smaller factor on a tie) is then refitted on all
# sequences, with lambda = c * trace(C_all) / n.

LAMBDA_GRID = (0.0, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def held_out_split(n_sequences: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows), each sorted: round(fraction * n) held-out sequences (at least 1, and 1 left to fit)."""
    if n_sequences < 2:
        raise ValueError(f"lambda_factor auto needs at least 2 calibration sequences to hold one out, "
                         f"got {n_sequences}; raise calibration n_samples or set a numeric lambda_factor")
    held = min(max(1, round(fraction * n_sequences)), n_sequences - 1)
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(int(seed)))
    return order[held:].sort().values, order[:held].sort().values


def ridge_path_errors(C_fit: torch.Tensor, cross_fit: torch.Tensor, prior: torch.Tensor, C_val: torch.Tensor,
                      cross_val: torch.Tensor, norm2_val: float, lambdas: list[float]) -> list[float]:
    """Held-out squared error of B(lambda) = (C_fit + lambda I)^-1 (cross_fit + lambda prior) for every lambda.

    All from the sums (see the section comment): one eigh of C_fit, then per lambda one product.
    """
    C_fit, C_val = C_fit.double(), C_val.double()
    e, V = torch.linalg.eigh(C_fit)
    cutoff = C_fit.shape[0] * torch.finfo(e.dtype).eps * 10 * float(e.abs().max())  # as _pinv's rtol
    P, Q = V.T @ cross_fit.double(), V.T @ prior.double()
    Xv = V.T @ cross_val.double()
    Cv = V.T @ C_val @ V
    del V
    errors = []
    for lam in lambdas:
        if lam > 0:
            X = (P + lam * Q) / (e + lam)[:, None]
        else:
            X = P * torch.where(e > cutoff, 1.0 / e, torch.zeros_like(e))[:, None]
        errors.append(max(float(norm2_val) - 2 * _dot(X, Xv) + _dot(X, Cv @ X), 0.0))
    return errors


@dataclass
class LambdaChoice:
    """The validation curve over the grid and the factor picked (lowest held-out error)."""

    factors: list[float]
    lambdas: list[float]  # c * trace(C_fit) / n: on the fit part's scale
    held_out_error: list[float]
    held_out_norm2: float
    pick: float

    def summary(self) -> dict:
        rel = [(e / self.held_out_norm2) ** 0.5 if self.held_out_norm2 > 0 else 0.0 for e in self.held_out_error]
        return {"grid": self.factors, "held_out_rel_error": rel, "held_out_error": self.held_out_error,
                "pick": self.pick, "pick_index": self.factors.index(self.pick)}


def choose_lambda(C_fit: torch.Tensor, cross_fit: torch.Tensor, prior: torch.Tensor, C_val: torch.Tensor,
                  cross_val: torch.Tensor, norm2_val: float, factors, scale: float) -> LambdaChoice:
    """The grid's held-out errors with lambda = factor * scale; the pick is the first minimum (smallest factor)."""
    factors = sorted(float(c) for c in factors)
    lambdas = [c * scale for c in factors]
    errors = ridge_path_errors(C_fit, cross_fit, prior, C_val, cross_val, norm2_val, lambdas)
    best = min(range(len(errors)), key=lambda i: (errors[i], i))
    return LambdaChoice(factors, lambdas, errors, float(norm2_val), factors[best])


def symmetric_kept(C: torch.Tensor, diag: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """C[keep][:, keep] (a new I x I tensor) from C's strict upper triangle and diag(C) only.

    For a C whose lower triangle holds a Cholesky factor (leverage_scores with overwrite).
    """
    keep = keep.to(C.device)
    rows = C[keep][:, keep].triu(1)
    out = rows + rows.T
    out.diagonal().copy_(diag[keep])
    return out
