"""Block-at-a-time activations against the model's own forward pass, storage options and resuming."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt import activations as act
from flattengpt.blockwise import BlockwiseModel

from .models_for_tests import ARCHITECTURES, STORIES, make_model


def reference_residuals(model_dir, input_ids):
    """X_0..X_L from the full model: output_hidden_states[:L] and the last block's output (before the norm)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(last=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    num_layers = model.config.num_hidden_layers
    return list(out.hidden_states[:num_layers]) + [captured["last"]], out.hidden_states[-1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blockwise_residuals_equal_model_forward(tmp_path, arch):
    model_dir = make_model(tmp_path, arch)
    input_ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    expected, after_norm = reference_residuals(model_dir, input_ids)
    runner = BlockwiseModel(model_dir)
    got = dict(runner.residual_stream(input_ids, batch_size=2))
    assert sorted(got) == list(range(runner.num_layers + 1))
    for index, hidden in got.items():
        torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5)
    # X_L is before the final norm; HF's last hidden state is after it.
    assert not torch.allclose(got[runner.num_layers], after_norm, atol=1e-3)


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_blockwise_on_real_model():
    input_ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    expected, _ = reference_residuals(STORIES, input_ids)
    got = dict(BlockwiseModel(STORIES).residual_stream(input_ids, batch_size=1))
    for index, hidden in got.items():
        torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5)


def test_stored_files_and_manifest(tmp_path):
    model_dir = make_model(tmp_path, "llama")
    input_ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    expected, _ = reference_residuals(model_dir, input_ids)
    out = tmp_path / "acts"
    manifest = act.compute_activations(model_dir, input_ids, out, state_dir=tmp_path / "state",
                                       store_dtype="float16", max_tokens=20, batch_size=3)
    assert manifest["num_layers"] == 4 and manifest["positions"] == 5 and manifest["stored_tokens"] == 20
    assert json.loads((out / "manifest.json").read_text())["files"] == [f"layer_{i:03d}.safetensors" for i in range(5)]
    assert not (tmp_path / "state").exists(), "resume state is removed after success"
    for index in range(5):
        hidden, positions = act.load_layer(out, index)
        assert hidden.dtype == torch.float16 and hidden.shape == (4, 5, 64)
        assert positions[-1] == 15 and torch.all(positions[1:] > positions[:-1])
        torch.testing.assert_close(hidden.float(), expected[index][:, positions], rtol=2e-3, atol=2e-3)


def test_select_positions_is_seeded_and_keeps_last():
    a = act.select_positions(8, 100, 80, seed=3)
    assert len(a) == 10 and a[-1] == 99 and torch.equal(a, act.select_positions(8, 100, 80, seed=3))
    assert not torch.equal(a, act.select_positions(8, 100, 80, seed=4))
    assert torch.equal(act.select_positions(8, 100, None, seed=0), torch.arange(100))


@pytest.mark.parametrize("checkpoint_every, saved", [(1, 3), (2, 2)])
def test_interrupted_run_resumes_from_last_block(tmp_path, monkeypatch, checkpoint_every, saved):
    """Killed while block 3 runs: resumes from the last hidden state saved (every `checkpoint_every` blocks)."""
    model_dir = make_model(tmp_path, "qwen2")
    input_ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    reference = act.compute_activations(model_dir, input_ids, tmp_path / "ref", state_dir=tmp_path / "s0")

    original = BlockwiseModel.load_block

    def failing_load_block(self, index, device=None):
        if index == 3:
            raise KeyboardInterrupt("simulated kill during block 3")
        return original(self, index, device)

    monkeypatch.setattr(BlockwiseModel, "load_block", failing_load_block)
    with pytest.raises(KeyboardInterrupt):
        act.compute_activations(model_dir, input_ids, tmp_path / "out", state_dir=tmp_path / "state",
                                checkpoint_every=checkpoint_every)
    assert not (tmp_path / "out").exists(), "no partial output"
    assert json.loads((tmp_path / "state" / "state.json").read_text())["next_layer"] == saved

    monkeypatch.setattr(BlockwiseModel, "load_block", original)
    manifest = act.compute_activations(model_dir, input_ids, tmp_path / "out", state_dir=tmp_path / "state",
                                       checkpoint_every=checkpoint_every)
    assert manifest["resumed_from_layer"] == saved and reference["resumed_from_layer"] == 0
    for index in range(5):
        assert torch.equal(act.load_layer(tmp_path / "out", index)[0], act.load_layer(tmp_path / "ref", index)[0])


def test_stale_resume_state_is_discarded(tmp_path, monkeypatch):
    model_dir = make_model(tmp_path, "llama")
    ids_a = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    ids_b = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    original = BlockwiseModel.load_block
    monkeypatch.setattr(BlockwiseModel, "load_block",
                        lambda self, i, d=None: (_ for _ in ()).throw(RuntimeError("stop")) if i == 2 else original(self, i, d))
    with pytest.raises(RuntimeError):
        act.compute_activations(model_dir, ids_a, tmp_path / "out", state_dir=tmp_path / "state")
    monkeypatch.setattr(BlockwiseModel, "load_block", original)
    manifest = act.compute_activations(model_dir, ids_b, tmp_path / "out", state_dir=tmp_path / "state")
    assert manifest["resumed_from_layer"] == 0
    fresh = act.compute_activations(model_dir, ids_b, tmp_path / "fresh", state_dir=tmp_path / "s2")
    assert torch.equal(act.load_layer(tmp_path / "out", 4)[0], act.load_layer(tmp_path / "fresh", 4)[0])
    assert fresh["num_layers"] == 4

