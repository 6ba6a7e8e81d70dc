"""Blockwise perplexity against the model's own loss."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt.perplexity import eval_windows, perplexity

from .models_for_tests import STORIES, make_model


def direct_perplexity(model_dir, windows):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]  # HF shifts labels itself
    return math.exp(torch.stack(losses).mean().item())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied output embeddings
def test_matches_model_loss(tmp_path, arch):
    model_dir = make_model(tmp_path, arch)
    ids = torch.randint(0, 128, (205,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(ids, 40)
    assert windows.shape == (5, 40), "the 5-token remainder is dropped"
    result = perplexity(model_dir, windows, batch_size=2)
    assert result["n_predicted_tokens"] == 5 * 39
    assert result["perplexity"] == pytest.approx(direct_perplexity(model_dir, windows), rel=1e-5)


@pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/data")
def test_real_model_on_a_story():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big red ball under a tree. She ran to the ball and picked it up. ") * 4
    windows = eval_windows(torch.tensor(tokenizer(text)["input_ids"]), 64)
    result = perplexity(STORIES, windows)
    assert result["perplexity"] == pytest.approx(direct_perplexity(STORIES, windows), rel=1e-5)
    assert result["perplexity"] < 20, "a real story model finds a simple story predictable"


def test_too_short_text():
    with pytest.raises(ValueError, match="fewer than one window of seq_len=64"):
        eval_windows(torch.arange(10), 64)


def test_stage_on_a_text_file_matches_direct_windows(tmp_path):
    """The stage tokenizes the file once, cuts non-overlapping windows and records the counts."""
    import json

    from transformers import AutoTokenizer

    from flattengpt.data import tokenize
    from flattengpt.provenance import write_json
    from flattengpt.stages import perplexity_stage

    from .models_for_tests import make_model_with_tokenizer

    model_dir = make_model_with_tokenizer(tmp_path / "model", "llama")
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(60))
    (tmp_path / "text.txt").write_text(text)
    write_json(tmp_path / "model.json", {"path": str(model_dir), "fingerprint": "test"})
    options = {"seq_len": 32, "max_windows": None, "batch_size": 3}
    record = perplexity_stage(tmp_path / "model.json", None, "text", {"source": "local", "path": str(tmp_path / "text.txt")},
                              options, {"device": "cpu", "dtype": "float32"}, tmp_path / "ppl.json", {})
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), text)
    n_windows = ids.numel() // 32
    assert record["n_tokens_in_corpus"] == ids.numel()
    assert record["n_windows"] == n_windows and record["n_predicted_tokens"] == n_windows * 31
    assert record["perplexity"] == pytest.approx(direct_perplexity(model_dir, eval_windows(ids, 32)), rel=1e-5)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == record["perplexity"]

    record = perplexity_stage(tmp_path / "model.json", None, "text", {"source": "local", "path": str(tmp_path / "text.txt")},
                              {**options, "max_windows": 2}, {"device": "cpu", "dtype": "float32"}, tmp_path / "p2.json", {})
    assert record["n_windows"] == 2  # the first two windows of the whole text's ids, from a tokenised prefix
    assert record["perplexity"] == pytest.approx(direct_perplexity(model_dir, eval_windows(ids, 32, 2)), rel=1e-5)

    with pytest.raises(ValueError, match="evaluation.perplexity.seq_len"):
        perplexity_stage(tmp_path / "model.json", None, "text", {"source": "local", "path": str(tmp_path / "text.txt")},
                         {**options, "seq_len": 100_000}, {"device": "cpu", "dtype": "float32"}, tmp_path / "p3.json", {})


def test_interrupted_run_resumes_with_the_identical_result(tmp_path, monkeypatch):
    """Killed in the third pass of two windows: the rerun evaluates windows 4.. only, same float64 result."""
    import json

    from flattengpt.blockwise import BlockwiseModel

    model_dir = make_model(tmp_path, "llama")  # 4 blocks
    windows = eval_windows(torch.randint(0, 128, (7 * 24,), generator=torch.Generator().manual_seed(3)), 24)
    options = dict(batch_size=2, checkpoint_every=2)
    reference = perplexity(model_dir, windows, state_dir=tmp_path / "ref-state", **options)
    assert not (tmp_path / "ref-state").exists(), "the state is removed on completion"
    assert reference["resumed_from_window"] == 0 and reference["n_windows"] == 7

    original, calls = BlockwiseModel.load_block, []

    def killed_in_third_pass(self, index, device=None):
        calls.append(index)
        if len(calls) > 2 * 4 + 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, index, device)

    monkeypatch.setattr(BlockwiseModel, "load_block", killed_in_third_pass)
    with pytest.raises(KeyboardInterrupt):
        perplexity(model_dir, windows, state_dir=tmp_path / "state", **options)
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert len(state["nll"]) == len(state["count"]) == 4
    monkeypatch.setattr(BlockwiseModel, "load_block", original)

    other = perplexity(model_dir, windows[:6], state_dir=tmp_path / "other", **options)
    assert other["resumed_from_window"] == 0, "other windows have another key"
    resumed = perplexity(model_dir, windows, state_dir=tmp_path / "state", **options)
    assert resumed["resumed_from_window"] == 4 and not (tmp_path / "state").exists()
    for field in ("perplexity", "mean_nll", "n_predicted_tokens", "n_windows"):
        assert resumed[field] == reference[field], field
    assert resumed["perplexity"] == pytest.approx(direct_perplexity(model_dir, windows), rel=1e-5)
