"""Tiny randomly initialised models of every supported architecture, and paths into ../shared."""

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_shared = REPO.parent / "shared" / "data"
SHARED = _shared if _shared.is_dir() else None
STORIES = _shared / "models" / "stories260K" / "hf"

# llama-mha: no grouped-query attention; qwen2 has q/k/v biases; mistral a sliding window.
ARCHITECTURES = ["llama", "llama-mha", "mistral", "qwen2"]


def tiny_config(arch: str, num_layers: int = 4, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
                  tie_word_embeddings=False)
    common.update(overrides)  # through the constructor, so derived per-layer lists (layer_types) follow
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "llama-mha":
        config = LlamaConfig(**{**common, "num_key_value_heads": common["num_attention_heads"]})
    elif arch == "mistral":
        config = MistralConfig(**{**common, "sliding_window": 8})
    elif arch == "qwen2":
        config = Qwen2Config(**{**common, "tie_word_embeddings": True})
    else:
        raise ValueError(arch)
    return config


def make_model(root: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model (with non-trivial norm scales and biases) under root/arch; return its path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.1)
    path = Path(root) / arch
    model.save_pretrained(path)
    return path


SAMPLE_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n"
) * 4


def make_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A small byte-level BPE tokenizer trained on a few sentences, saved as a HF tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def make_model_with_tokenizer(root: Path, arch: str, **overrides) -> Path:
    """A tiny random model whose vocabulary covers a byte-level tokenizer saved beside it."""
    path = make_model(root, arch, vocab_size=320, **overrides)
    make_tokenizer(path, vocab_size=300)
    return path
