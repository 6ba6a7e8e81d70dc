"""Similarity between residual-stream points X_0 .. X_L, computed from the stored activations.

Four views of the same activations (METHOD.md sections 1 and 7):

- cosine `S[i, j]`: mean over every stored token of cos(X_i[t], X_j[t]); FlattenGPT's plan uses it;
- ShortGPT block influence `BI_l = 1 - S[l, l+1]`;
- Gromov et al.'s angular distance `d(i, j) = arccos(cos(X_i[last], X_j[last])) / pi`, on the last
  token of each sequence, averaged over sequences;
- linear CKA between X_i and X_j on a seeded token subsample.

Nothing assumes the activations fit in memory: the cosine and angular passes load the same token
chunk from every layer file at once (safetensors slices, so only that chunk is read), and CKA reads
only its subsampled tokens. Sums are accumulated in float64 whatever dtype the files hold.

Rows and columns of every matrix are labelled "X0" .. "XL": Xi is the input of block i, X0 the
embeddings and XL the output of the last block, before the final norm.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from .provenance import atomic_path, file_sha256, read_json, write_json
from .provenance import provenance as make_provenance

log = logging.getLogger(__name__)

MATRICES = ("cosine", "angular_distance", "cka")
DEFAULT_MEMORY_MB = 256  # per token chunk, all layers; larger chunks are not faster (cache)


# ----------------------------------------------------------------------------- reading activations


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def residual_labels(num_layers: int) -> list[str]:
    return [f"X{i}" for i in range(num_layers + 1)]


def label_meaning(num_layers: int) -> dict[str, str]:
    return {"X0": "embeddings (input of block 0)",
            "Xi": "input of block i (output of block i-1)",
            f"X{num_layers}": f"output of the last block {num_layers - 1}, before the final norm"}


def read_manifest(act_dir: str | Path) -> dict:
    act_dir = Path(act_dir)
    manifest = read_json(act_dir / "manifest.json")
    missing = [layer_file(i) for i in range(manifest["num_layers"] + 1) if not (act_dir / layer_file(i)).is_file()]
    if missing:
        raise FileNotFoundError(f"{act_dir}: activation files missing: {', '.join(missing)}; "
                                "rerun the activations step")
    return manifest


@contextlib.contextmanager
def open_layers(act_dir: str | Path, num_layers: int) -> Iterator[list]:
    """Lazy `hidden` slices of X_0 .. X_L: indexing one reads only that part of the file."""
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(Path(act_dir) / layer_file(i), framework="pt"))
                   for i in range(num_layers + 1)]
        yield [handle.get_slice("hidden") for handle in handles]


def stored_positions(act_dir: str | Path) -> torch.Tensor:
    with safe_open(Path(act_dir) / layer_file(0), framework="pt") as handle:
        return handle.get_tensor("positions")


def token_chunks(n_samples: int, n_positions: int, bytes_per_token: int, chunk_samples: int | None = None,
                 memory_mb: float = DEFAULT_MEMORY_MB) -> list[tuple[slice, slice]]:
    """(sample slice, position slice) chunks that cover every stored token once.

    `chunk_samples` fixes whole-sequence chunks; otherwise chunks are sized to `memory_mb`, splitting
    sequences along positions when one sequence alone is too big.
    """
    if chunk_samples is not None:
        if chunk_samples < 1:
            raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
        return [(slice(a, min(a + chunk_samples, n_samples)), slice(0, n_positions))
                for a in range(0, n_samples, chunk_samples)]
    tokens = max(1, int(memory_mb * 2**20) // bytes_per_token)
    if tokens >= n_positions:
        return token_chunks(n_samples, n_positions, bytes_per_token, chunk_samples=tokens // n_positions)
    return [(slice(s, s + 1), slice(p, min(p + tokens, n_positions)))
            for s in range(n_samples) for p in range(0, n_positions, tokens)]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float64 (an all-zero row stays zero: cosine 0 with anything)."""
    x = x.to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _symmetric_with_diagonal(matrix: torch.Tensor, diagonal: float) -> np.ndarray:
    matrix = (matrix + matrix.T) / 2
    matrix.fill_diagonal_(diagonal)
    return matrix.numpy()


# ----------------------------------------------------------------------------- the four views


def cosine_matrix(act_dir: str | Path, chunk_samples: int | None = None,
                  memory_mb: float = DEFAULT_MEMORY_MB) -> np.ndarray:
    """S[i, j] = mean over all stored tokens t of cos(X_i[t], X_j[t]), shape (L+1) x (L+1)."""
    manifest = read_manifest(act_dir)
    num_layers = manifest["num_layers"]
    total = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    n_tokens = 0
    with open_layers(act_dir, num_layers) as layers:
        n_samples, n_positions, hidden = layers[0].get_shape()
        # two float64 copies of the chunk of every layer are alive at once
        bytes_per_token = 2 * 8 * (num_layers + 1) * hidden
        for samples, positions in token_chunks(n_samples, n_positions, bytes_per_token, chunk_samples, memory_mb):
            units = torch.stack([_unit_rows(layer[samples, positions]).reshape(-1, hidden) for layer in layers])
            # sum_t <u_i[t], u_j[t]> for all (i, j) at once: one product of the flattened chunks
            flat = units.reshape(num_layers + 1, -1)
            total += flat @ flat.T
            n_tokens += units.shape[1]
    return _symmetric_with_diagonal(total / n_tokens, 1.0)


def block_influence(similarity: np.ndarray) -> np.ndarray:
    """ShortGPT's BI_l = 1 - S[l, l+1] for blocks l = 0 .. L-1: low means the block changes little."""
    similarity = np.asarray(similarity, dtype=np.float64)
    return 1.0 - np.diagonal(similarity, offset=1)


def angular_distance_matrix(act_dir: str | Path, chunk_samples: int | None = None,
                            memory_mb: float = DEFAULT_MEMORY_MB) -> np.ndarray:
    """d(i, j) = mean over sequences of arccos(cos(X_i[last], X_j[last])) / pi (Gromov et al.)."""
    manifest = read_manifest(act_dir)
    num_layers = manifest["num_layers"]
    positions = stored_positions(act_dir)
    seq_len = manifest.get("seq_len")
    if seq_len is not None and int(positions[-1]) != seq_len - 1:
        raise ValueError(f"{act_dir}: the last stored position is {int(positions[-1])}, not the last token "
                         f"{seq_len - 1}; angular distance needs the last token of each sequence")
    total = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    with open_layers(act_dir, num_layers) as layers:
        n_samples, n_positions, hidden = layers[0].get_shape()
        last = n_positions - 1
        for samples, _ in token_chunks(n_samples, 1, 2 * 8 * (num_layers + 1) * hidden, chunk_samples, memory_mb):
            units = torch.stack([_unit_rows(layer[samples, last]) for layer in layers], dim=1)  # [n, L+1, H]
            cosines = (units @ units.transpose(1, 2)).clamp(-1.0, 1.0)
            total += (torch.arccos(cosines) / math.pi).sum(dim=0)
    return _symmetric_with_diagonal(total / n_samples, 0.0)


def cka_token_sample(n_samples: int, n_positions: int, max_tokens: int, seed: int) -> np.ndarray:
    """Sorted flat indices (sample * n_positions + position) of the CKA subsample: all tokens, or a seeded subset."""
    n_total = n_samples * n_positions
    if max_tokens >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=max_tokens, replace=False))


def cka_form(n_tokens: int, hidden: int, n_points: int) -> str:
    """The cheaper of the two equal formulas, by multiply-adds.

    kernel: one n x n Gram per layer (n^2 H each), then n^2 per pair of layers;
    feature: ||X_i^T X_j||_F^2 per pair of layers (n H^2 each).
    """
    pairs = n_points * (n_points + 1) / 2
    kernel = n_points * n_tokens**2 * hidden + pairs * n_tokens**2
    feature = pairs * n_tokens * hidden**2
    return "kernel" if kernel <= feature else "feature"


def cka_matrix(act_dir: str | Path, max_tokens: int = 2048, seed: int = 0, form: str | None = None,
               return_info: bool = False):
    """Linear CKA between X_i and X_j on the same seeded subsample of at most `max_tokens` stored tokens.

    CKA(X, Y) = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F) with X, Y centered over tokens, which equals
    <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F) for the centered Gram matrices K = X X^T. It is invariant to
    scaling and to orthogonal transforms of either representation, and CKA(X, X) = 1.
    `form` picks the formula (default: the cheaper, see `cka_form`). Memory: (L+1) n^2 float64 in the
    kernel form (34 MB per layer at n = 2048), (L+1) n H in the feature form.
    """
    if max_tokens < 2:
        raise ValueError(f"cka_max_tokens must be at least 2, got {max_tokens}")
    manifest = read_manifest(act_dir)
    num_layers = manifest["num_layers"]
    with open_layers(act_dir, num_layers) as layers:
        n_samples, n_positions, hidden = layers[0].get_shape()
        tokens = cka_token_sample(n_samples, n_positions, max_tokens, seed)
        form = form or cka_form(len(tokens), hidden, num_layers + 1)
        if form not in ("kernel", "feature"):
            raise ValueError(f"form {form!r} is not 'kernel' or 'feature'")
        sample_of, position_of = np.divmod(tokens, n_positions)
        # per layer: the unit-norm centered Gram (n^2 values) or the centered tokens (n x H), one buffer
        per_layer = (len(tokens), len(tokens)) if form == "kernel" else (len(tokens), hidden)
        stats = torch.empty(num_layers + 1, *per_layer, dtype=torch.float64)
        for index, layer in enumerate(layers):
            x = torch.stack([layer[int(s), int(p)] for s, p in zip(sample_of, position_of)]).to(torch.float64)
            x = x - x.mean(dim=0, keepdim=True)
            if form == "kernel":
                torch.matmul(x, x.T, out=stats[index])
                stats[index] /= stats[index].norm()
            else:
                stats[index] = x
    if form == "kernel":
        flat = stats.reshape(num_layers + 1, -1)
        cka = flat @ flat.T
    else:
        cross = torch.empty(num_layers + 1, num_layers + 1, dtype=torch.float64)
        for i in range(num_layers + 1):
            for j in range(i, num_layers + 1):
                cross[i, j] = cross[j, i] = (stats[i].T @ stats[j]).square().sum()
        norms = cross.diagonal().sqrt()
        cka = cross / torch.outer(norms, norms)
    result = _symmetric_with_diagonal(cka, 1.0)
    if not np.isfinite(result).all():
        log.warning("CKA is undefined (NaN) where a layer's subsampled tokens have no variance")
    info = {"tokens": int(len(tokens)), "max_tokens": max_tokens, "seed": seed, "form": form,
            "subsampled": bool(len(tokens) < n_samples * n_positions)}
    return (result, info) if return_info else result


# ----------------------------------------------------------------------------- files


def save_matrix(matrix: np.ndarray, labels: list[str], path: str | Path) -> None:
    frame = pd.DataFrame(np.asarray(matrix, dtype=np.float64), index=labels, columns=labels)
    frame.index.name = "X"
    with atomic_path(path) as tmp:
        frame.to_csv(tmp)


def load_matrix(csv_path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(matrix, labels) of a square matrix CSV written by `compute_all`."""
    frame = pd.read_csv(csv_path, index_col=0)
    labels = [str(c) for c in frame.columns]
    if frame.shape[0] != frame.shape[1] or [str(i) for i in frame.index] != labels:
        raise ValueError(f"{csv_path} is not a square matrix with matching row and column labels")
    return frame.to_numpy(dtype=np.float64), labels


def block_influence_table(bi: np.ndarray) -> pd.DataFrame:
    """One row per block; rank 1 = lowest influence (the first block ShortGPT removes), ties by lower index."""
    order = np.argsort(bi, kind="stable")
    rank = np.empty(len(bi), dtype=int)
    rank[order] = np.arange(1, len(bi) + 1)
    return pd.DataFrame({"block": np.arange(len(bi)), "input": [f"X{l}" for l in range(len(bi))],
                         "output": [f"X{l + 1}" for l in range(len(bi))], "block_influence": bi, "rank": rank})


def compute_all(act_dir: str | Path, out_dir: str | Path, cka_max_tokens: int = 2048, seed: int = 0, *,
                chunk_samples: int | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                provenance: dict | None = None, note: str | None = None) -> dict[str, np.ndarray]:
    """Write cosine, angular distance, CKA and block influence (CSV + PNG) and similarity.json to `out_dir`.

    `note` (e.g. that a model was restored from a quantized file) goes under every title and into the JSON.
    """
    from . import plots

    act_dir, out_dir = Path(act_dir), Path(out_dir)
    manifest = read_manifest(act_dir)
    num_layers = manifest["num_layers"]
    labels = residual_labels(num_layers)
    timings = {}

    started = time.perf_counter()
    cosine = cosine_matrix(act_dir, chunk_samples=chunk_samples, memory_mb=memory_mb)
    timings["cosine"] = time.perf_counter() - started
    started = time.perf_counter()
    angular = angular_distance_matrix(act_dir, chunk_samples=chunk_samples, memory_mb=memory_mb)
    timings["angular_distance"] = time.perf_counter() - started
    started = time.perf_counter()
    cka, cka_info = cka_matrix(act_dir, max_tokens=cka_max_tokens, seed=seed, return_info=True)
    timings["cka"] = time.perf_counter() - started
    bi = block_influence(cosine)

    stored_tokens = manifest["n_samples"] * manifest["positions"]
    titles = {
        "cosine": f"Cosine similarity of block inputs (mean over {stored_tokens} tokens)",
        "angular_distance": f"Angular distance, last token ({manifest['n_samples']} sequences)",
        "cka": f"Linear CKA ({cka_info['tokens']} tokens, seed {seed})",
    }
    if note:
        titles = {name: f"{title}\n{note}" for name, title in titles.items()}
    arrays = {"cosine": cosine, "angular_distance": angular, "cka": cka}
    for name, matrix in arrays.items():
        save_matrix(matrix, labels, out_dir / f"{name}.csv")
        plots.heatmap(matrix, labels, titles[name], out_dir / f"{name}.png")
    table = block_influence_table(bi)
    with atomic_path(out_dir / "block_influence.csv") as tmp:
        table.to_csv(tmp, index=False)
    plots.bar(bi, [str(l) for l in range(num_layers)],
              "ShortGPT block influence BI = 1 - S[l, l+1]" + (f"\n{note}" if note else ""),
              out_dir / "block_influence.png", xlabel="block", ylabel="block influence")

    options = {"cka_max_tokens": cka_max_tokens, "seed": seed, "chunk_samples": chunk_samples, "memory_mb": memory_mb}
    if provenance is None:
        provenance = make_provenance(params=options,
                                     inputs={"activations_manifest_sha256": file_sha256(act_dir / "manifest.json")})
    size = [num_layers + 1, num_layers + 1]
    write_json(out_dir / "similarity.json", {
        "num_layers": num_layers,
        "note": note,
        "labels": labels,
        "label_meaning": label_meaning(num_layers),
        "matrices": {
            "cosine": {"file": "cosine.csv", "shape": size, "tokens": stored_tokens,
                       "definition": "S[i,j] = mean over stored tokens of cos(X_i[t], X_j[t])"},
            "angular_distance": {"file": "angular_distance.csv", "shape": size, "tokens": manifest["n_samples"],
                                 "definition": "d(i,j) = mean over sequences of "
                                               "arccos(cos(X_i[last], X_j[last])) / pi"},
            "cka": {"file": "cka.csv", "shape": size, "tokens": cka_info["tokens"],
                    "definition": "linear CKA of X_i and X_j, tokens centered, on a seeded token subsample"},
            "block_influence": {"file": "block_influence.csv", "shape": [num_layers], "tokens": stored_tokens,
                                "definition": "BI_l = 1 - S[l, l+1]; rank 1 = lowest"},
        },
        "cka": cka_info,
        "activations": {key: manifest.get(key) for key in
                        ("n_samples", "seq_len", "positions", "stored_tokens", "hidden_size", "dtype")},
        "options": options,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "provenance": provenance,
    })
    log.info("similarity of %d residual points from %d tokens (CKA: %d tokens, %s form) written to %s",
             num_layers + 1, stored_tokens, cka_info["tokens"], cka_info["form"], out_dir)
    return {**arrays, "block_influence": bi}
