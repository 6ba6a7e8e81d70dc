"""ReplaceMe (Shopkhoev et al., NeurIPS 2025): drop a span, fold a fitted linear map into the block before it.

Choice (plan rule, from the angular-distance view, as Gromov et al.): the span l..l+k-1 minimizing
d(l, l+k) = arccos(cos(X_l[last], X_{l+k}[last])) / pi over l >= 1 (ties: the lower l). l = 0 is
not a candidate: the map is folded into block a = l-1, so a block must precede the cut. The plan
keeps blocks < a and >= l+k and has one layer Layer("patch", [a, l, ..., l+k-1]).

Build of the patched layer, on x = the calibration hidden states at block a's input in the
compressed model (the driver propagates them through the kept blocks below):

    h = x + Attn(N1(x))                 block a's residual after attention (the input of its MLP norm)
    M = MLP(N2(h)) = psi W_down^T       block a's MLP output (psi: down_proj's input); y_a = h + M
    Y = blocks l..c (c = l+k-1) of the original model applied to y_a, i.e. blocks a..c applied to x
    R = Y - h                           what block a's MLP must add for the shallower model to land on Y

    T = argmin_T ||M T - R||^2 + lambda ||T - I||^2 = (G + lambda I)^-1 (M^T R + lambda I)
      = I + (G + lambda I)^-1 (M^T R - G),      G = M^T M,   lambda = lambda_factor * trace(G) / d

over all calibration tokens (rows). At lambda = 0 (the paper's least squares, the default) the
min-norm deviation from the identity is used, T = I + pinv(G) (M^T R - G): G can be singular (fewer
tokens than d, or dead directions), and among the least-squares minimizers this one is the closest
to plain dropping in ||T - I||_F; with fewer tokens than d it reproduces R exactly on them. T = I is plain dropping of the
span and is feasible, so the fit's calibration error never exceeds plain dropping's. Writing
D = T - I and g = M^T (R - M) = M^T R - G, both errors come from the sums without cancellation
against ||R||^2:

    plain:  ||M - R||^2 = ||Y - y_a||^2                      accumulated directly, per token
    fit:    ||M T - R||^2 = ||M - R||^2 - 2 <D, g> + <D, G D>   (<= plain: at the optimum it is
            plain - <D, G D> - 2 lambda ||D||^2, and -<g, pinv(G) g> at lambda = 0)

The map is folded into down_proj: M T = psi (W_down^T T), so the new weight is T^T W_down (formed
in float64, cast to the stored dtype); a down_proj bias b would become T^T b. Every other tensor of
block a, and every kept block, is the stored tensor bit for bit.

Options (fit options: the span does not depend on them): lambda_factor (>= 0, default 0, or "auto":
the factor of lambda_grid with the lowest error on held-out calibration sequences, from one
eigendecomposition of the fit part's G (prune.choose_lambda, prior T = I), then the map refitted on
all sequences; validation_fraction, validation_seed, lambda_grid as FlattenGPT's). Under auto the
fit and held-out parts' sums are kept apart: two more d x d float64 sums, and the grid's
eigenvectors and rotated sums (three d x d).

Cost, in block forwards of the calibration set (N x T tokens): the fit runs block a and the k
removed blocks once each (k + 1), with all k + 1 blocks resident so that each batch goes through
them in one go; the driver then runs the patched block once to propagate, and every kept layer once
(below the cut: their outputs are the patch's input; above: the calibration NLL of the result).
In all L + 1 forwards for a model of L blocks, plus the float64 sums G and M^T R (4 N T d^2 flops),
one d x d solve (O(d^3)) and the fold (2 d^2 I).

Memory beyond the driver's hidden states: (k + 1) blocks in the compute dtype on the device, one
batch's activations, and two d x d float64 sums (G and M^T R, 2 d^2 8 bytes, on the device); the
solve adds at most four more d x d float64 matrices (G + lambda I and its Cholesky factor, or eigh's
eigenvectors and a product; D; the residual check), and the fold two d x I float64 ones (W_down
and T^T W_down).

Where this departs from the paper and its released code (github.com/mts-ai/ReplaceMe, lstsq.py):
  * only the closed-form L2 objective; the paper also offers a cosine-distance objective solved
    numerically (Adam on T), not implemented;
  * the span comes from the similarity stage's last-token angular distance, as Gromov et al.; the
    released code uses the same distance on the last non-padded token, between block outputs only
    (it strips the embedding), so its spans also start at l >= 1;
  * regularisation: the released code adds alpha I to G (a ridge toward T = 0, alpha absolute) and
    inverts; here the ridge pulls toward T = I (plain dropping), lambda is relative to trace(G) / d,
    and lambda = 0 (the paper's least squares, the default of both) uses the pseudo-inverse, so a
    singular G (few tokens, dead directions) is no failure;
  * M and R come from the compressed model's hidden states at block a (the driver's propagation),
    the released code runs the original model whole; the two agree wherever the blocks below the
    cut are kept, as in this plan. R is formed in float32 at least, whatever the compute dtype;
  * the folded down_proj is cast to the dtype the checkpoint stores it in (released code: bfloat16);
  * one span only (the released code can fit several maps, num_A > 1).
"""

from __future__ import annotations

import numpy as np
import torch

from ..blockwise import BlockwiseModel
from ..flatten import check_block, names
from ..plan import Layer, Plan
from ..prune import LAMBDA_GRID, Gram, choose_lambda, held_out_split
from .base import Built, BuildContext, Method, MethodError, build_standard
from .flattengpt import check_validation_options
from .gromov import gromov_span, span_distances

FIRST_START = 1  # the span must leave one block before it to take the map


def replaceme_plan(distance, k: int, method: str = "replaceme") -> Plan:
    """The patch plan for the span l..l+k-1 (l >= 1) minimizing d(l, l+k); steps list every start."""
    span = gromov_span(distance, k, first=FIRST_START)
    num_layers = np.asarray(distance).shape[0] - 1
    start, end = span[0], span[-1]
    layers = [Layer("keep", [b]) for b in range(start - 1)]
    layers.append(Layer("patch", list(range(start - 1, end + 1))))
    layers += [Layer("keep", [b]) for b in range(end + 1, num_layers)]
    # every start is listed, l = 0 too, so that a skipped minimum at l = 0 is visible in plan.json
    steps = [{"start": l, "distance": d, "eligible": l >= FIRST_START, "chosen": l == start}
             for l, d in span_distances(distance, k)]
    return Plan(num_layers=num_layers, layers=layers, steps=steps, method=method)


# ----------------------------------------------------------------------------- the fit


class _Split:
    """Hooks on one block that keep h (the input of its MLP norm) and M (down_proj's output) of each call."""

    def __init__(self, block: torch.nn.Module, adapter):
        n = names(adapter)
        self.seen: dict[str, torch.Tensor] = {}

        def keep_h(module, args, kwargs):
            self.seen["h"] = args[0] if args else next(iter(kwargs.values()))

        def keep_m(module, args, output):
            self.seen["M"] = output

        self.handles = [block.get_submodule(n["norm2"]).register_forward_pre_hook(keep_h, with_kwargs=True),
                        block.get_submodule(n["down"]).register_forward_hook(keep_m)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _rows_sq_sum(t: torch.Tensor, chunk_elements: int = 2**24) -> float:
    """sum(t^2) in float64, at most chunk_elements converted at a time (a float64 copy of a batch is large)."""
    t = t.reshape(-1, t.shape[-1])
    rows = max(1, chunk_elements // t.shape[1])
    return sum(float(t[i:i + rows].double().square().sum()) for i in range(0, t.shape[0], rows))


@torch.no_grad()
def span_sums(runner: BlockwiseModel, blocks: list[int], hidden: torch.Tensor,
              batch_size: int, rows: torch.Tensor | None = None) -> tuple[Gram, float]:
    """The float64 sums of the fit over the calibration set: (Gram of M with target R, ||M - R||^2).

    `blocks` = [a, l, ..., c]; `hidden` is block a's input. Block a runs once per batch (its hooks
    give h and M, its output y_a), then the removed blocks run on y_a to give Y, as the original model.
    `rows`: only these calibration sequences (lambda_factor auto sums the fit and held-out parts apart).
    """
    device, dtype = runner.device, runner.dtype
    # R = Y - h and Y - y_a are differences of large residuals: form them in float32 at least
    target_dtype = torch.promote_types(dtype, torch.float32)
    first, removed = blocks[0], blocks[1:]
    block_a = runner.load_block(first)
    originals = [runner.load_block(i) for i in removed]
    split = _Split(block_a, runner.adapter)
    gram, plain = Gram(), 0.0
    try:
        count = hidden.shape[0] if rows is None else len(rows)
        for start in range(0, count, batch_size):
            part = hidden[start:start + batch_size] if rows is None else hidden[rows[start:start + batch_size]]
            x = part.to(device, dtype)
            y = block_a(x, **runner.block_kwargs(first, x))
            y_a = y[0] if isinstance(y, tuple) else y
            h, M = split.seen.pop("h"), split.seen.pop("M")
            y = y_a
            for index, block in zip(removed, originals):
                y = block(y, **runner.block_kwargs(index, y))
                y = y[0] if isinstance(y, tuple) else y
            R = y.to(target_dtype) - h.to(target_dtype)
            gram.add(M, R)
            # plain dropping's error ||M - R||^2 = ||Y - y_a||^2, summed directly rather than from the sums
            plain += _rows_sq_sum(y.to(target_dtype) - y_a.to(target_dtype))
            del x, y, y_a, h, M, R
    finally:
        split.remove()
    gram.check_finite("the ReplaceMe fit (block outputs)")
    if not np.isfinite(plain):
        raise FloatingPointError("non-finite activations in the ReplaceMe fit (block outputs)")
    return gram, plain


def solve_transform(G: torch.Tensor, g: torch.Tensor, lambda_factor: float) -> tuple[torch.Tensor, dict]:
    """D = T - I of the ridge fit toward the identity, and how it was solved; g = M^T (R - M) = M^T R - G.

    D = (G + lambda I)^-1 g with lambda = lambda_factor * trace(G) / d; at lambda = 0 the min-norm
    D = pinv(G) g (eigenvalues below d * eps * 10 of the largest count as zero). Solving for D rather
    than T keeps the right-hand side small where the span adds little (g = 0: plain dropping is optimal).
    """
    d = G.shape[0]
    lam = float(lambda_factor) * float(torch.trace(G)) / d
    info: dict = {"lambda": lam}
    if lam > 0:
        A = G.clone()
        A.diagonal().add_(lam)
        factor, status = torch.linalg.cholesky_ex(A)
        if int(status) != 0:
            raise torch.linalg.LinAlgError(f"the {d}x{d} ReplaceMe system is not positive definite; "
                                           "try a larger lambda_factor or 0")
        D = torch.cholesky_solve(g, factor)
        del factor
        info.update(method="cholesky", condition_bound=1 + float(torch.trace(G)) / lam)
        residual = A @ D - g
        del A
    else:
        w, V = torch.linalg.eigh(G)
        cutoff = d * torch.finfo(G.dtype).eps * 10 * float(w.abs().max())  # as prune._pinv's rtol
        inverse = torch.where(w > cutoff, 1.0 / w, torch.zeros_like(w))
        D = V @ (inverse[:, None] * (V.T @ g))
        info.update(method="pinv", rank=int((w > cutoff).sum()), of=d)
        del V
        residual = G @ D - g  # zero also where G is singular: g lies in G's range
    norm = float(g.norm())
    info["relative_residual"] = float(residual.norm()) / norm if norm > 0 else 0.0
    if not torch.isfinite(D).all():
        raise FloatingPointError("the ReplaceMe solve returned a non-finite map")
    return D, info


def fit_error(G: torch.Tensor, g: torch.Tensor, plain: float, D: torch.Tensor) -> float:
    """||M (I + D) - R||^2 = ||M - R||^2 - 2 <D, g> + <D, G D>, g = M^T (R - M): the fit's error from the sums."""
    change = -2 * float(torch.dot(D.reshape(-1), g.reshape(-1))) + float(torch.dot(D.reshape(-1), (G @ D).reshape(-1)))
    return max(plain + change, 0.0)  # rounding can leave a tiny negative number where the fit is exact


def fold_transform(tensors: dict[str, torch.Tensor], adapter, T: torch.Tensor,
                   dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Block a's tensors with down_proj W <- T^T W (and a bias b <- T^T b): M T = psi (W^T T)."""
    down = names(adapter)["down"]
    out = dict(tensors)
    T = T.double()
    for kind in ("weight", "bias"):
        key = f"{down}.{kind}"
        if key in tensors:
            value = tensors[key].to(T.device, torch.float64)
            folded = T.T @ value  # weight: (d x d) (d x I); bias: (d x d) (d,)
            out[key] = folded.to("cpu", dtypes.get(key, tensors[key].dtype))
    return out


class ReplaceMe(Method):
    name = "replaceme"
    chooses_with = "similarity"
    fits = True
    summary = "drop the Gromov span (l >= 1), fold a least-squares linear map into the block before it"
    OPTIONS = {"lambda_factor": 0.0, "validation_fraction": 0.25, "validation_seed": 0, "lambda_grid": list(LAMBDA_GRID)}
    CHOICE_OPTIONS = ()  # the span comes from the angular distance alone

    def check_options(self) -> None:
        check_validation_options(self.options)

    def _sums(self, ctx: BuildContext, layer: Layer, hidden) -> tuple[Gram, float, dict | None, float]:
        """The fit's sums over all sequences, the validation record (lambda_factor auto) and the factor used."""
        o = self.options
        if o["lambda_factor"] != "auto":
            gram, plain = span_sums(ctx.runner, layer.blocks, hidden, ctx.batch_size)
            return gram, plain, None, o["lambda_factor"]
        fit_rows, held_rows = held_out_split(hidden.shape[0], o["validation_fraction"], o["validation_seed"])
        gram, plain = span_sums(ctx.runner, layer.blocks, hidden, ctx.batch_size, fit_rows)
        held, held_plain = span_sums(ctx.runner, layer.blocks, hidden, ctx.batch_size, held_rows)
        d = gram.C.shape[0]
        identity = torch.eye(d, dtype=gram.C.dtype, device=gram.C.device)  # the prior: T = I, plain dropping
        choice = choose_lambda(gram.C, gram.cross, identity, held.C, held.cross, held.norm2, o["lambda_grid"],
                               float(torch.trace(gram.C)) / d)
        del identity
        gram.C.add_(held.C)
        gram.cross.add_(held.cross)
        gram.norm2 += held.norm2
        gram.tokens += held.tokens
        record = {"held_out_sequences": held_rows.tolist(), "fit_sequences": len(fit_rows),
                  "fraction": o["validation_fraction"], "seed": o["validation_seed"], "map": choice.summary()}
        return gram, plain + held_plain, record, choice.pick

    def choose(self, k, *, views=None, search=None, target=None) -> Plan:
        return replaceme_plan(views.angular_distance, k, method=self.name)

    def build(self, ctx: BuildContext, layer: Layer, hidden) -> Built:
        if layer.op == "keep":
            return build_standard(ctx, layer)
        if layer.op != "patch":
            raise MethodError(f"replaceme builds keep and patch layers, not {layer.op!r}")
        if not torch.isfinite(hidden).all():
            raise FloatingPointError("non-finite activations at the patched block's input; try dtype float32 "
                                     "or check the checkpoint")
        runner, base = ctx.runner, layer.base
        source = ctx.source_tensors(base)
        check_block(source, runner.adapter, runner.adapter.shape)
        gram, plain, validation, factor = self._sums(ctx, layer, hidden)
        g, gram.cross = gram.cross.sub_(gram.C), None  # M^T (R - M), in the storage of M^T R
        D, solve = solve_transform(gram.C, g, factor)
        fit = fit_error(gram.C, g, plain, D)
        del g
        gram.C = None
        d = D.shape[0]
        deviation = float(D.norm()) / d ** 0.5  # ||T - I||_F / sqrt(d): 0 is plain dropping
        D.diagonal().add_(1.0)  # T = I + D, in D's storage, on the device the sums were made on
        tensors = fold_transform(source, runner.adapter, D, ctx.save_dtypes(base))
        del D

        def relative(err: float) -> float:  # squared error over ||R||^2 (FlattenGPT's rel_error is its root)
            return err / gram.norm2 if gram.norm2 > 0 else 0.0

        stats = {
            "op": "patch", "blocks": layer.blocks, "replaced_blocks": layer.blocks[1:],
            "lambda_factor": factor, "lambda": solve.pop("lambda"),
            **({"lambda_validation": validation} if validation else {}),
            "tokens": gram.tokens, "target_norm2": gram.norm2,
            "error_plain_drop": plain, "error_fit": fit,
            "rel_sq_error_plain_drop": relative(plain), "rel_sq_error_fit": relative(fit),
            "map_deviation": deviation,
            "solve": solve,
        }
        ctx.log(f"replaceme: blocks {layer.blocks[1]}-{layer.blocks[-1]} folded into block {base}: calibration "
                f"error {relative(plain):.4f} -> {relative(fit):.4f} of ||R||^2 ({gram.tokens} tokens, "
                f"{solve['method']})")
        return Built(tensors, stats)  # the driver runs the saved block to propagate the hidden states
