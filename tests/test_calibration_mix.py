"""Calibration sets mixing several texts: stated proportions, reproducible by seed, windows traceable."""

import json

import pytest
import torch

from flattengpt import data
from flattengpt.config import ConfigError, check_config, validate_config

from .models_for_tests import REPO, make_tokenizer

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SEQ_LEN = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Three local texts that share no token sequences: lowercase prose, digits, and JSONL records in capitals."""
    root = tmp_path_factory.mktemp("texts")
    prose = root / "prose.txt"
    prose.write_text("".join(f"it was the best of times, it was the worst of times, number {'x' * (i % 7)}.\n"
                             for i in range(60)))
    digits = root / "digits.txt"
    digits.write_text(" ".join(str(n * 7919 % 100_003) for n in range(600)))
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"SAY {'AB' * (i % 5)} QUICKLY", "output": "OK DONE"}) + "\n"
                               for i in range(80)))
    return [{"source": "local", "path": str(prose)},
            {"source": "local", "path": str(digits)},
            {"source": "local", "path": str(records), "fields": ["instruction", "output"]}]


def mix_of(texts, proportions):
    return [{**text, "proportion": p} for text, p in zip(texts, proportions)]


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("proportions, n_samples, counts", [
    ([0.5, 0.3, 0.2], 10, [5, 3, 2]),       # exact in decimal, although 0.3 * 10 is 3.0000000000000004 in floats
    ([5, 3, 2], 10, [5, 3, 2]),             # only the ratios matter
    ([1, 1, 1], 10, [4, 3, 3]),             # equal remainders: the earlier source gets the window
    ([0.45, 0.35, 0.2], 7, [3, 3, 1]),      # 3.15 / 2.45 / 1.4: the largest remainder (0.45) gets the 7th
    ([2, 1, 1], 6, [3, 2, 1]),              # 3 / 1.5 / 1.5, tie to the earlier
    ([0.95, 0.05], 10, [10, 0]),            # 9.5 / 0.5, tie to the earlier: the second gets none
    ([0.7], 3, [3]),
])
def test_mix_counts_largest_remainder(proportions, n_samples, counts):
    assert data.mix_counts(proportions, n_samples) == counts
    assert sum(data.mix_counts(proportions, n_samples)) == n_samples


@pytest.mark.parametrize("bad", [[0.5, 0], [1, -1], [1, True], [1, float("nan")], [1, "a"], [1, None]])
def test_mix_counts_rejects_non_positive_proportions(bad):
    with pytest.raises(ValueError, match=r"mix\[1\]\.proportion"):
        data.mix_counts(bad, 10)


# ----------------------------------------------------------------------------- windows


def test_mixed_calibration_has_the_stated_proportions_and_traceable_windows(tokenizer, texts):
    spec = {"mix": mix_of(texts, [0.5, 0.3, 0.2])}
    windows, info = data.build_calibration(tokenizer, spec, n_samples=10, seq_len=SEQ_LEN, seed=3)
    assert windows.shape == (10, SEQ_LEN) and windows.dtype == torch.long
    assert [source["count"] for source in info["mix"]] == [5, 3, 2]
    assert [info["window_sources"].count(i) for i in range(3)] == [5, 3, 2]
    assert info["window_sources"] != sorted(info["window_sources"])  # shuffled, not source after source
    assert [source["proportion"] for source in info["mix"]] == [0.5, 0.3, 0.2]
    assert (info["n_samples"], info["seq_len"], info["seed"], info["bos_added"]) == (10, SEQ_LEN, 3, False)
    assert info["windows_sha256"] == data.tensor_sha256(windows)
    assert info["tokenizer"]["vocab_size"] == len(tokenizer)
    for i, (source, text) in enumerate(zip(info["mix"], texts)):
        assert source["text"] == data.load_text(text)[1]
        assert len(source["starts"]) == source["count"]
        recorded = [s for s, w in zip(info["window_starts"], info["window_sources"]) if w == i]
        assert sorted(recorded) == sorted(source["starts"])
    # Independent check: each window is its recorded source's tokens at its recorded start.
    contents = [data.load_text(text)[0] for text in texts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in contents]
    for row, source, start in zip(windows.tolist(), info["window_sources"], info["window_starts"]):
        assert row == ids[source][start : start + SEQ_LEN]
        # ... and decodes to text of that source only (the three texts share no 8-token run).
        assert tokenizer.decode(row) in contents[source]
        assert all(tokenizer.decode(row) not in contents[j] for j in range(3) if j != source)
    json.dumps(info)  # storable as safetensors metadata


def test_mixed_calibration_is_reproducible_by_seed(tokenizer, texts):
    spec = {"mix": mix_of(texts, [0.45, 0.35, 0.2])}
    a, info_a = data.build_calibration(tokenizer, spec, n_samples=7, seq_len=SEQ_LEN, seed=11)
    b, info_b = data.build_calibration(tokenizer, spec, n_samples=7, seq_len=SEQ_LEN, seed=11)
    c, info_c = data.build_calibration(tokenizer, spec, n_samples=7, seq_len=SEQ_LEN, seed=12)
    assert torch.equal(a, b) and info_a == info_b
    assert [source["count"] for source in info_a["mix"]] == [3, 3, 1] == [source["count"] for source in info_c["mix"]]
    assert not torch.equal(a, c) and info_a["windows_sha256"] != info_c["windows_sha256"]
    assert [s["starts"] for s in info_a["mix"]] != [s["starts"] for s in info_c["mix"]]
    # Per-source seeds differ by index, so two identical texts in one mix get different windows.
    same = {"mix": mix_of([texts[0], texts[0]], [1, 1])}
    _, info_same = data.build_calibration(tokenizer, same, n_samples=6, seq_len=SEQ_LEN, seed=0)
    assert info_same["mix"][0]["seed"] != info_same["mix"][1]["seed"]
    assert info_same["mix"][0]["starts"] != info_same["mix"][1]["starts"]


def test_single_source_calibration_is_unchanged(tokenizer, texts):
    windows, info = data.build_calibration(tokenizer, texts[0], n_samples=6, seq_len=SEQ_LEN, seed=5)
    ids = data.tokenize(tokenizer, data.load_text(texts[0])[0])
    expected, starts = data.sample_windows(ids, 6, SEQ_LEN, seed=5)
    assert torch.equal(windows, expected) and info["starts"] == starts
    assert set(info) == {"text", "tokenizer", "n_samples", "seq_len", "seed", "starts", "n_tokens_in_corpus",
                         "bos_added", "windows_sha256"}
    assert info["text"] == data.load_text(texts[0])[1]


def test_mixed_calibration_errors_name_the_mix_item(tokenizer, texts, tmp_path):
    with pytest.raises(ValueError, match=r"mix\[1\] \(local .*digits.txt\): proportion 0.05 of n_samples=10 rounds "
                                         r"to 0 windows; raise n_samples to at least 20"):
        data.build_calibration(tokenizer, {"mix": mix_of(texts, [0.95, 0.05])}, n_samples=10, seq_len=SEQ_LEN, seed=0)
    short = tmp_path / "short.txt"
    short.write_text("it was the best")
    spec = {"mix": mix_of(texts[:2] + [{"source": "local", "path": str(short)}], [1, 1, 1])}
    with pytest.raises(ValueError, match=r"mix\[2\] \(local .*short.txt\): text too short: n_samples=3 x seq_len=8"):
        data.build_calibration(tokenizer, spec, n_samples=9, seq_len=SEQ_LEN, seed=0)
    spec = {"mix": mix_of([texts[0], {"source": "local", "path": str(tmp_path / "gone.txt")}], [1, 1])}
    with pytest.raises(FileNotFoundError, match=r"mix\[1\] \(local .*gone.txt\): text file .* does not exist"):
        data.build_calibration(tokenizer, spec, n_samples=4, seq_len=SEQ_LEN, seed=0)
    with pytest.raises(ValueError, match="either `source` or `mix`, not both"):
        data.build_calibration(tokenizer, {**texts[0], "mix": mix_of(texts, [1, 1, 1])}, 3, SEQ_LEN, 0)
    with pytest.raises(ValueError, match=r"mix\[0\]\.proportion: 0 is not a positive number"):
        data.build_calibration(tokenizer, {"mix": mix_of(texts, [0, 1, 1])}, 3, SEQ_LEN, 0)


# ----------------------------------------------------------------------------- config


def config_with(calibration):
    return {"models": {"m": {"source": "embedded", "name": "smollm2-135m-instruct"}},
            "calibration": {"c": calibration}, "targets": {"t": {"remove_blocks": 2}}}


def test_schema_accepts_a_mix_and_fills_defaults_only_in_its_items(texts):
    config = validate_config(config_with({"mix": mix_of(texts[:2], [3, 1]) + [{"source": "hub", "name": "ptb",
                                                                              "proportion": 1}]}), SCHEMA)
    calibration = config["calibration"]["c"]
    assert set(calibration) == {"mix", "n_samples", "seq_len", "seed"}  # no top-level fields/split beside mix
    assert calibration["mix"][0] == {**texts[0], "proportion": 3, "fields": ["text"], "split": "train"}
    assert "fields" not in calibration["mix"][2]  # hub datasets keep their own fields, as for a single text
    single = validate_config(config_with({"source": "embedded", "name": "shakespeare-calibration"}), SCHEMA)
    assert single["calibration"]["c"] == {"source": "embedded", "name": "shakespeare-calibration", "fields": ["text"],
                                          "split": "train", "n_samples": 32, "seq_len": 256, "seed": 0}


@pytest.mark.parametrize("calibration, message", [
    ({"source": "embedded", "name": "shakespeare-calibration",
      "mix": [{"source": "embedded", "name": "shakespeare-calibration", "proportion": 1}]},
     "calibration.c: give exactly one of source, mix"),
    ({"name": "shakespeare-calibration"}, "calibration.c: give exactly one of source, mix"),
    ({"mix": []}, "calibration.c.mix: [] should be non-empty"),
    ({"mix": [{"source": "embedded", "name": "shakespeare-calibration", "proportion": 0}]},
     "calibration.c.mix.0.proportion: 0 is less than or equal to the minimum of 0"),
    ({"mix": [{"source": "embedded", "name": "shakespeare-calibration"}]},
     "calibration.c.mix.0: 'proportion' is a required property"),
    ({"mix": [{"source": "embedded", "name": "shakespeare-calibration", "proportion": 1, "seed": 3}]},
     "calibration.c.mix.0: Additional properties are not allowed ('seed' was unexpected)"),
])
def test_schema_rejects_bad_mixes(calibration, message):
    with pytest.raises(ConfigError) as info:
        validate_config(config_with(calibration), SCHEMA)
    assert any(e.startswith(message) for e in info.value.errors), info.value.errors


def test_config_checks_name_the_mix_item(texts, tmp_path):
    mix = mix_of(texts[:1] + [{"source": "local", "path": str(tmp_path / "nope.txt")},
                              {"source": "hub", "name": "pile"}, {"source": "embedded", "name": "shakespeare-eval"}],
                 [0.9, 0.04, 0.03, 0.03])
    with pytest.raises(ConfigError) as info:
        check_config(config_with({"mix": mix, "name": "stray", "n_samples": 10}))
    text = str(info.value)
    assert "calibration.c: name beside `mix`" in text
    assert "calibration.c.mix[1].path: " in text and "nope.txt does not exist" in text
    assert "calibration.c.mix[2].name: 'pile' is not a known hub dataset" in text
    # 9 / 0.4 / 0.3 / 0.3: the tenth window goes to mix[1], mix[2] and mix[3] get none.
    assert "calibration.c.mix[2].proportion: 0.03 of n_samples=10 rounds to 0 windows; raise calibration.c.n_samples " \
           "to at least 34" in text
    assert "calibration.c.mix[3].proportion" in text and "calibration.c.mix[1].proportion" not in text
    with pytest.raises(ConfigError, match=r"calibration.c.mix\[0\].proportion: -1; give a positive number"):
        check_config(config_with({"mix": mix_of(texts[:1], [-1])}))
    check_config(config_with({"mix": mix_of(texts, [0.5, 0.3, 0.2]), "n_samples": 10}))  # no error
