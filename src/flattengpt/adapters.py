"""Model adapters: everything that differs between decoder architectures lives here.

The algorithms (activations, flattening, pruning) talk to a model only through a `ModelAdapter`:
the names of the per-block weight tensors, the attention/MLP shapes, how to build one decoder block,
the rotary embedding and the attention mask, and how to rewrite the config for a shallower model.
They never branch on the model type.

Supported: pre-norm decoders with RMSNorm, rotary attention (optionally grouped-query, optionally
q/k/v biases) and a SwiGLU MLP, i.e. the Llama family, Mistral and Qwen2. Architectures whose
blocks cannot be folded into one wide block of the same form are rejected up front.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


# Architectures users often try, and why flattening cannot fold them into a standard block.
KNOWN_UNSUPPORTED = {
    "qwen3": "per-head q/k RMSNorms (q_norm, k_norm) sit between the projections and attention, "
    "so norm scales cannot be folded into q/k weights",
    "qwen3_moe": "per-head q/k norms and a mixture-of-experts MLP",
    "gemma": "normalises with (1 + weight) and scales embeddings; not a plain RMSNorm pre-norm block",
    "gemma2": "post-sublayer norms (post_attention_layernorm / post_feedforward_layernorm) "
    "wrap each sublayer, so a block is not x + f(N(x))",
    "gemma3": "post-sublayer norms and per-head q/k norms",
    "olmo2": "post-sublayer norms and q/k norms",
    "phi3": "fused qkv_proj and gate_up_proj tensors",
    "mixtral": "mixture-of-experts MLP",
    "gpt2": "LayerNorm with bias and learned absolute positions",
    "opt": "LayerNorm with bias and a ReLU MLP",
}


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str
    module: str  # transformers modeling module
    prefix: str  # class-name prefix in that module, e.g. "Llama"


@dataclass(frozen=True)
class BlockShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool

    @property
    def kv_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


class ModelAdapter:
    """Llama-family decoder (also the base for Mistral and Qwen2, which share tensor names)."""

    spec = ArchitectureSpec("llama", "transformers.models.llama.modeling_llama", "Llama")

    # Tensor names, relative to a block's prefix.
    attn_projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_projections = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    embed_key = "model.embed_tokens.weight"
    final_norm_key = "model.norm.weight"
    lm_head_key = "lm_head.weight"

    def __init__(self, config: Any):
        self.config = config
        self.check(config)

    # ------------------------------------------------------------------ checks and shapes
    @classmethod
    def check(cls, config: Any) -> None:
        """Raise UnsupportedArchitectureError for variants of this family that cannot be flattened."""
        if _get(config, "mlp_bias", False):
            raise UnsupportedArchitectureError(
                f"{_get(config, 'model_type')}: mlp_bias=True is not supported (MLP biases cannot be pruned "
                "with the channel compensation); supported models have bias-free gate/up/down projections"
            )
        act = _get(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(
                f"{_get(config, 'model_type')}: hidden_act={act!r}; only SwiGLU (silu) MLPs are supported"
            )

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def shape(self) -> BlockShape:
        c = self.config
        num_heads = int(c.num_attention_heads)
        head_dim = _get(c, "head_dim", None) or c.hidden_size // num_heads
        bias = bool(_get(c, "attention_bias", False))
        return BlockShape(
            hidden_size=int(c.hidden_size),
            num_heads=num_heads,
            num_kv_heads=int(_get(c, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            intermediate_size=int(c.intermediate_size),
            qkv_bias=bias,
            o_bias=bias,
        )

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def block_tensor_names(self) -> list[str]:
        """Names of one block's parameters, relative to its prefix."""
        shape = self.shape
        names = [f"{p}.weight" for p in self.attn_projections + self.mlp_projections]
        if shape.qkv_bias:
            names += [f"{p}.bias" for p in self.attn_projections[:3]]
        if shape.o_bias:
            names.append(f"{self.attn_projections[3]}.bias")
        names += [f"{self.attn_norm}.weight", f"{self.mlp_norm}.weight"]
        return names

    # ------------------------------------------------------------------ modules
    def _module(self):
        return importlib.import_module(self.spec.module)

    def _class(self, suffix: str):
        return getattr(self._module(), f"{self.spec.prefix}{suffix}")

    def build_layer(self, index: int, **overrides: Any) -> nn.Module:
        """An empty decoder block (weights on the meta device until loaded).

        `overrides` change config fields for this block only, e.g. `width_overrides(...)` for the
        wide block of a flattened group.
        """
        config = self.config
        if overrides:
            config = copy.deepcopy(config)
            for key, value in overrides.items():
                setattr(config, key, value)
        with torch.device("meta"):
            layer = self._class("DecoderLayer")(config, index)
        return layer

    def width_overrides(self, shape: BlockShape) -> dict[str, int]:
        """Config fields that give a block the head counts and MLP width of `shape` (head_dim explicit)."""
        return {
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate_size,
        }

    def build_rotary(self, device: torch.device | str = "cpu") -> nn.Module:
        return self._class("RotaryEmbedding")(self.config).to(device)

    def build_final_norm(self) -> nn.Module:
        return self._class("RMSNorm")(self.config.hidden_size, eps=self.config.rms_norm_eps)

    def layer_type(self, index: int) -> str:
        layer_types = _get(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return "full_attention"

    def attention_mask(self, index: int, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        """The mask the model itself would pass block `index` for full, unpadded sequences."""
        from transformers import masking_utils

        fn = masking_utils.create_causal_mask
        if self.layer_type(index) == "sliding_attention" or (
            self.layer_type(index) == "full_attention" and self._global_sliding_window()
        ):
            fn = masking_utils.create_sliding_window_causal_mask
        return fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )

    def _global_sliding_window(self) -> bool:
        return False

    def config_width(self, shape: BlockShape) -> BlockShape:
        """The narrowest shape at least as wide as `shape` (same H/KV ratio) that the config class accepts.

        Zero-padded (flatten-only) checkpoints need it: Llama's config validation insists that
        num_attention_heads divide hidden_size even with an explicit head_dim, so 3 x 4 heads of
        width 16 in a 64-wide model are stored as 16 heads, 4 of them zero.
        """
        for num_heads in range(shape.num_heads, 64 * shape.num_heads + 1, shape.kv_group_size):
            candidate = replace(shape, num_heads=num_heads, num_kv_heads=num_heads // shape.kv_group_size)
            config = copy.deepcopy(self.config)
            for key, value in self.width_overrides(candidate).items():
                setattr(config, key, value)
            try:
                if hasattr(config, "validate"):
                    config.validate()
            except Exception:  # transformers' strict-dataclass validators raise their own error type
                continue
            return candidate
        raise UnsupportedArchitectureError(f"no head count from {shape.num_heads} up is accepted by the config class")

    # ------------------------------------------------------------------ shallower configs
    def shallower_config(self, source_layers: list[int], **overrides: Any) -> Any:
        """Config of a model whose block i is derived from original block `source_layers[i]`.

        `num_hidden_layers` and every per-layer list are rewritten; `overrides` set other fields
        (for example widened head counts of a flatten-only checkpoint).
        """
        config = copy.deepcopy(self.config)
        old_layers = self.num_layers
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == old_layers and key != "architectures":
                setattr(config, key, type(value)(value[i] for i in source_layers))
        config.num_hidden_layers = len(source_layers)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


class MistralAdapter(ModelAdapter):
    spec = ArchitectureSpec("mistral", "transformers.models.mistral.modeling_mistral", "Mistral")

    def _global_sliding_window(self) -> bool:
        return _get(self.config, "sliding_window", None) is not None


class Qwen2Adapter(ModelAdapter):
    spec = ArchitectureSpec("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2")

    @property
    def shape(self) -> BlockShape:
        base = super().shape
        # Qwen2 always has q/k/v biases and a bias-free o_proj.
        return BlockShape(**{**base.__dict__, "qkv_bias": True, "o_bias": False})

    def shallower_config(self, source_layers: list[int], **overrides: Any) -> Any:
        config = super().shallower_config(source_layers, **overrides)
        # max_window_layers counts bottom layers that use full attention; keep the same boundary.
        mwl = _get(self.config, "max_window_layers", None)
        if mwl is not None:
            config.max_window_layers = sum(1 for s in source_layers if s < mwl)
        return config


ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": ModelAdapter,
    "mistral": MistralAdapter,
    "qwen2": Qwen2Adapter,
}
SUPPORTED = tuple(sorted(ADAPTERS))


def check_supported(config: Any) -> type[ModelAdapter]:
    """Return the adapter class for a config (object or config.json dict), or raise a clear error."""
    model_type = _get(config, "model_type", None)
    architectures = _get(config, "architectures", None) or []
    name = f"model_type '{model_type}'" + (f" ({', '.join(architectures)})" if architectures else "")
    if model_type not in ADAPTERS:
        reason = KNOWN_UNSUPPORTED.get(model_type, "no adapter is implemented for it")
        raise UnsupportedArchitectureError(
            f"{name} is not supported: {reason}. Supported model types: {', '.join(SUPPORTED)} "
            "(Llama-2/3, SmolLM2, TinyLlama, Mistral, Qwen-1.5/2/2.5)."
        )
    cls = ADAPTERS[model_type]
    cls.check(config)
    return cls


def get_adapter(config: Any) -> ModelAdapter:
    return check_supported(config)(config)
