"""Similarity views against direct numpy float64 computations, by hand, and under chunking."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from flattengpt import similarity as sim


def write_activations(directory, hidden_states, positions=None, seq_len=None, dtype=torch.float32):
    """An activation directory as the activations step writes it: X_0 .. X_L, each [n, P, H] plus positions."""
    directory.mkdir(parents=True, exist_ok=True)
    n_samples, n_positions, hidden = hidden_states[0].shape
    positions = torch.arange(n_positions) if positions is None else torch.as_tensor(positions, dtype=torch.int64)
    seq_len = int(positions[-1]) + 1 if seq_len is None else seq_len
    files = []
    for index, hidden_state in enumerate(hidden_states):
        files.append(f"layer_{index:03d}.safetensors")
        save_file({"hidden": hidden_state.to(dtype).contiguous(), "positions": positions}, str(directory / files[-1]))
    manifest = {"num_layers": len(hidden_states) - 1, "n_samples": n_samples, "seq_len": seq_len,
                "positions": n_positions, "stored_tokens": n_samples * n_positions, "hidden_size": hidden,
                "dtype": str(dtype).removeprefix("torch."), "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def random_states(num_layers=5, n_samples=6, n_positions=7, hidden=16, seed=0):
    """A residual-stream-like sequence: each X_{l+1} = X_l + a random update, so layers are correlated."""
    generator = torch.Generator().manual_seed(seed)
    states = [torch.randn(n_samples, n_positions, hidden, generator=generator)]
    for _ in range(num_layers):
        states.append(states[-1] + 0.7 * torch.randn(n_samples, n_positions, hidden, generator=generator))
    return states


@pytest.fixture(scope="module")
def llama_states():
    """X_0 .. X_4 of a tiny random Llama (the HF last state is after the final norm; fine for these tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return list(model(input_ids, output_hidden_states=True).hidden_states)


# ----------------------------------------------------------------------------- independent references


def reference_cosine(states):
    tokens = [s.double().numpy().reshape(-1, s.shape[-1]) for s in states]
    n = len(tokens)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            a, b = tokens[i], tokens[j]
            out[i, j] = np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return out


def reference_angular(states):
    last = [s.double().numpy()[:, -1, :] for s in states]
    n = len(last)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            a, b = last[i], last[j]
            cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out[i, j] = np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi)
    return out


def hsic(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H)


def reference_cka(states, tokens=None):
    """CKA via HSIC with the explicit centering matrix (a third formula, beside the two in the module)."""
    xs = [s.double().numpy().reshape(-1, s.shape[-1]) for s in states]
    if tokens is not None:
        xs = [x[tokens] for x in xs]
    grams = [x @ x.T for x in xs]
    n = len(grams)
    return np.array([[hsic(grams[i], grams[j]) / math.sqrt(hsic(grams[i], grams[i]) * hsic(grams[j], grams[j]))
                      for j in range(n)] for i in range(n)])


# ----------------------------------------------------------------------------- cosine


def test_cosine_by_hand(tmp_path):
    # two tokens, two residual points, hidden size 2:
    #   token a: X0 = (1, 0), X1 = (1, 1)  -> cos = 1/sqrt(2)
    #   token b: X0 = (0, 2), X1 = (3, 0)  -> cos = 0
    # S[0, 1] is the mean of the cosines, 0.35355..., not the cosine of the mean vectors (0.6).
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    x1 = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])
    act = write_activations(tmp_path / "acts", [x0, x1])
    S = sim.cosine_matrix(act)
    np.testing.assert_allclose(S, [[1, 0.5 / math.sqrt(2)], [0.5 / math.sqrt(2), 1]], atol=1e-15)
    np.testing.assert_allclose(sim.block_influence(S), [1 - 0.5 / math.sqrt(2)])
    # the last token is b, orthogonal in both: angular distance 1/2
    np.testing.assert_allclose(sim.angular_distance_matrix(act), [[0, 0.5], [0.5, 0]], atol=1e-15)


def test_cosine_matches_numpy_on_llama_states(tmp_path, llama_states):
    act = write_activations(tmp_path / "acts", llama_states)
    S = sim.cosine_matrix(act)
    np.testing.assert_allclose(S, reference_cosine(llama_states), rtol=0, atol=1e-6)
    assert S.shape == (5, 5)
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_array_equal(np.diag(S), 1.0)


@pytest.mark.parametrize("options", [{"chunk_samples": 1}, {"chunk_samples": 4}, {"chunk_samples": 100},
                                     {"memory_mb": 0.001}])  # the last splits sequences along positions
def test_chunking_does_not_change_results(tmp_path, options):
    states = random_states()
    act = write_activations(tmp_path / "acts", states)
    whole = sim.cosine_matrix(act, chunk_samples=len(states[0]))
    np.testing.assert_allclose(sim.cosine_matrix(act, **options), whole, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sim.angular_distance_matrix(act, **options), sim.angular_distance_matrix(act),
                               rtol=0, atol=1e-13)


def test_token_chunks_cover_every_token_once():
    for chunks in (sim.token_chunks(5, 7, 8, chunk_samples=2), sim.token_chunks(5, 7, 8 * 1024, memory_mb=0.02),
                   sim.token_chunks(5, 7, 8, memory_mb=1)):
        covered = np.zeros((5, 7), dtype=int)
        for samples, positions in chunks:
            covered[samples, positions] += 1
        assert (covered == 1).all()
    assert len(sim.token_chunks(5, 7, 8 * 1024, memory_mb=0.02)) > 5  # 2 tokens per chunk: splits sequences


def test_half_precision_files_are_read_exactly(tmp_path):
    states = [s.to(torch.bfloat16) for s in random_states()]
    act = write_activations(tmp_path / "acts", states, dtype=torch.bfloat16)
    np.testing.assert_allclose(sim.cosine_matrix(act), reference_cosine(states), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- angular distance


def test_angular_distance_matches_numpy(tmp_path, llama_states):
    act = write_activations(tmp_path / "acts", llama_states)
    D = sim.angular_distance_matrix(act)
    np.testing.assert_allclose(D, reference_angular(llama_states), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(D, D.T)
    np.testing.assert_array_equal(np.diag(D), 0.0)


def test_angular_distance_uses_only_the_last_token(tmp_path):
    states = random_states()
    changed = [s.clone() for s in states]
    for s in changed:
        s[:, :-1] = torch.randn_like(s[:, :-1])
    a = write_activations(tmp_path / "a", states)
    b = write_activations(tmp_path / "b", changed)
    np.testing.assert_allclose(sim.angular_distance_matrix(a), sim.angular_distance_matrix(b), rtol=0, atol=1e-15)
    assert not np.allclose(sim.cosine_matrix(a), sim.cosine_matrix(b), atol=1e-3)


def test_angular_distance_needs_the_last_position(tmp_path):
    states = random_states(n_positions=3)
    act = write_activations(tmp_path / "acts", states, positions=[0, 4, 7], seq_len=10)
    with pytest.raises(ValueError, match="last token"):
        sim.angular_distance_matrix(act)


# ----------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("form", ["kernel", "feature"])
def test_cka_matches_hsic_formula(tmp_path, llama_states, form):
    act = write_activations(tmp_path / "acts", llama_states)
    C = sim.cka_matrix(act, max_tokens=10_000, form=form)
    np.testing.assert_allclose(C, reference_cka(llama_states), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.diag(C), 1.0)
    np.testing.assert_array_equal(C, C.T)


@pytest.mark.parametrize("form", ["kernel", "feature"])
def test_cka_subsample_is_seeded_and_shared_by_all_layers(tmp_path, form):
    states = random_states(n_samples=6, n_positions=7)  # 42 tokens
    act = write_activations(tmp_path / "acts", states)
    C, info = sim.cka_matrix(act, max_tokens=20, seed=3, form=form, return_info=True)
    tokens = sim.cka_token_sample(6, 7, 20, seed=3)
    assert info["tokens"] == len(tokens) == 20 and info["subsampled"] and info["form"] == form
    np.testing.assert_allclose(C, reference_cka(states, tokens), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(C, sim.cka_matrix(act, max_tokens=20, seed=3, form=form))
    assert not np.allclose(C, sim.cka_matrix(act, max_tokens=20, seed=4, form=form))


@pytest.mark.parametrize("form", ["kernel", "feature"])
def test_cka_invariances(tmp_path, form):
    # X1 = X0 scaled, X2 = X0 rotated by an orthogonal Q and shifted, X3 unrelated: CKA(X0, X1) =
    # CKA(X0, X2) = 1 and CKA(X0, X3) < 1. With max_tokens < tokens this also shows that every
    # layer uses the same token subsample (different subsamples would not give exactly 1).
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 9, 12, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    states = [x0, 7.5 * x0, x0 @ q + 3.0, torch.randn(4, 9, 12, generator=generator, dtype=torch.float64)]
    act = write_activations(tmp_path / "acts", states, dtype=torch.float64)
    C = sim.cka_matrix(act, max_tokens=25, seed=1, form=form)
    np.testing.assert_allclose(C[0, 1], 1.0, atol=1e-12)
    np.testing.assert_allclose(C[0, 2], 1.0, atol=1e-12)
    np.testing.assert_allclose(C[1, 2], 1.0, atol=1e-12)
    assert C[0, 3] < 0.9


def test_cka_form_choice():
    assert sim.cka_form(n_tokens=2048, hidden=4096, n_points=33) == "kernel"  # LLaMA-2-7B
    assert sim.cka_form(n_tokens=2048, hidden=64, n_points=5) == "feature"  # tiny test models


# ----------------------------------------------------------------------------- files


def test_compute_all_writes_labelled_files(tmp_path):
    states = random_states(num_layers=4)
    act = write_activations(tmp_path / "acts", states)
    out = tmp_path / "similarity"
    arrays = sim.compute_all(act, out, cka_max_tokens=30, seed=2)

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["cosine.csv", "cosine.png", "angular_distance.csv", "angular_distance.png", "cka.csv",
                            "cka.png", "block_influence.csv", "block_influence.png", "similarity.json"])
    for name in ("cosine", "angular_distance", "cka"):
        frame = pd.read_csv(out / f"{name}.csv", index_col=0)
        assert list(frame.columns) == list(frame.index) == ["X0", "X1", "X2", "X3", "X4"]
        np.testing.assert_array_equal(frame.to_numpy(), arrays[name])  # full float64 round trip
        matrix, labels = sim.load_matrix(out / f"{name}.csv")
        np.testing.assert_array_equal(matrix, arrays[name])
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(arrays["cosine"], reference_cosine(states), atol=1e-12)

    table = pd.read_csv(out / "block_influence.csv")
    assert list(table.columns) == ["block", "input", "output", "block_influence", "rank"]
    assert list(table.block) == [0, 1, 2, 3] and list(table.input) == ["X0", "X1", "X2", "X3"]
    np.testing.assert_allclose(table.block_influence, 1 - np.diag(arrays["cosine"], 1))
    assert table.sort_values("rank").block.tolist() == list(np.argsort(table.block_influence, kind="stable"))

    meta = json.loads((out / "similarity.json").read_text())
    assert meta["matrices"]["cosine"]["shape"] == [5, 5] and meta["matrices"]["cosine"]["tokens"] == 42
    assert meta["matrices"]["angular_distance"]["tokens"] == 6
    assert meta["cka"]["tokens"] == 30 and meta["cka"]["seed"] == 2
    assert meta["provenance"]["inputs"]["activations_manifest_sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_load_matrix_rejects_non_square(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame([[1.0, 2.0]], index=["X0"], columns=["X0", "X1"]).to_csv(path)
    with pytest.raises(ValueError, match="square"):
        sim.load_matrix(path)


# ----------------------------------------------------------------------------- the stored copy's defaults


def _calibration_ids(tmp_path, n_samples, seq_len):
    """(model dir, [n_samples, seq_len] ids): stories260K on Shakespeare where ../shared exists, else a random Llama."""
    from .models_for_tests import SHARED, STORIES, make_model

    if STORIES.exists():
        from transformers import AutoTokenizer

        text = (SHARED / "text" / "tinyshakespeare.input.txt").read_text()[:200_000]
        ids = torch.tensor(AutoTokenizer.from_pretrained(STORIES)(text)["input_ids"])
        return STORIES, ids[: n_samples * seq_len].view(n_samples, seq_len)
    model_dir = make_model(tmp_path, "llama", num_layers=6)
    return model_dir, torch.randint(0, 128, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))


def test_capped_bfloat16_copy_gives_the_full_float32_matrices_and_plan(tmp_path):
    """The default stored copy (a quarter of the tokens here, bfloat16) against every token in float32.

    Measured on stories260K, 32 x 256 Shakespeare tokens: bfloat16 alone moves cosine, angular
    distance and CKA by <= 6e-5; keeping 2048 of 8192 tokens moves the cosine means by <= 3e-3
    (sampling), angular distance not at all (every last token is kept), and CKA by its different
    token subsample (CKA itself moves ~0.02 between 1024 and 8192 tokens of the full copy).
    The greedy plans agree for every k.
    """
    from flattengpt.activations import DEFAULT_STORE_DTYPE, compute_activations
    from flattengpt.checkpoint import Checkpoint
    from flattengpt.plan import make_plan

    assert DEFAULT_STORE_DTYPE == "bfloat16"
    model_dir, ids = _calibration_ids(tmp_path, 32, 256)
    copies = {"full": ("float32", None), "bf16": ("bfloat16", None), "capped": ("bfloat16", 2048)}
    views = {}
    for name, (store_dtype, max_tokens) in copies.items():
        out = tmp_path / name
        manifest = compute_activations(model_dir, ids, out, state_dir=tmp_path / f"state-{name}",
                                       store_dtype=store_dtype, max_tokens=max_tokens)
        hidden_bytes = sum((out / sim.layer_file(i)).stat().st_size for i in range(manifest["num_layers"] + 1))
        # the formula counts the hidden states; each file adds its positions and a small header
        assert 0 < hidden_bytes - manifest["sizes"]["output_bytes"] < (manifest["num_layers"] + 1) * 4096
        views[name] = {"cosine": sim.cosine_matrix(out), "angular": sim.angular_distance_matrix(out),
                       "cka": sim.cka_matrix(out, max_tokens=1024)}
    full = views["full"]
    assert sim.read_manifest(tmp_path / "capped")["stored_tokens"] == 2048
    for view in full:  # precision alone: same tokens, same CKA subsample
        np.testing.assert_allclose(views["bf16"][view], full[view], rtol=0, atol=2e-4, err_msg=view)
    capped = views["capped"]
    np.testing.assert_allclose(capped["cosine"], full["cosine"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(sim.block_influence(capped["cosine"]), sim.block_influence(full["cosine"]),
                               rtol=0, atol=1e-2)
    np.testing.assert_allclose(capped["angular"], full["angular"], rtol=0, atol=2e-4)
    np.testing.assert_allclose(capped["cka"], full["cka"], rtol=0, atol=0.08)
    counts = Checkpoint(model_dir).parameter_counts()
    for k in range(1, len(counts["per_block"]) - 1):
        assert make_plan(capped["cosine"], counts, {"remove_blocks": k}).groups == \
            make_plan(full["cosine"], counts, {"remove_blocks": k}).groups, k


def test_float16_overflow_names_the_option(tmp_path):
    """A float16 copy of activations beyond 65504 fails the stage instead of storing inf."""
    from safetensors.torch import load_file, save_file as save

    from flattengpt.activations import compute_activations

    from .models_for_tests import make_model

    model_dir = make_model(tmp_path, "llama")
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= 1e8  # X_0 = the embeddings, far beyond float16's range
    save(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="activations.store_dtype: float16 overflows X_0"):
        compute_activations(model_dir, ids, tmp_path / "out", state_dir=tmp_path / "state", store_dtype="float16")
    compute_activations(model_dir, ids, tmp_path / "out", state_dir=tmp_path / "state", store_dtype="bfloat16")
