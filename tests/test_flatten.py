"""Norm folding, flattening and zero-padding against the original blocks computed by hand."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from flattengpt.blockwise import BlockwiseModel
from flattengpt.flatten import (block_state, build_block, check_block, concat_blocks, flatten_group, fold_norms,
                                names, pad_block, widen)

from .models_for_tests import ARCHITECTURES, make_model

# llama-obias: Llama with attention_bias=True, so o_proj has a bias that the flattened block must sum.
VARIANTS = ARCHITECTURES + ["llama-obias"]


def make_variant(root, variant, **overrides):
    if variant == "llama-obias":
        return make_model(root, "llama", attention_bias=True, **overrides)
    return make_model(root, variant, **overrides)


def load_reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hand_mask(seq_len, window=None):
    """Additive causal mask [1, 1, T, T]; with a sliding window, key j is seen by query i iff i - window < j <= i."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None]
    allowed = j <= i
    if window:
        allowed &= j > i - window
    return torch.zeros(seq_len, seq_len).masked_fill(~allowed, float("-inf"))[None, None]


def layer_kwargs(model, x):
    """What a decoder layer of `model` needs for full sequences, built from the model's own rotary embedding."""
    positions = torch.arange(x.shape[1])[None]
    return {"position_embeddings": model.model.rotary_emb(x, positions), "position_ids": positions,
            "attention_mask": hand_mask(x.shape[1], getattr(model.config, "sliding_window", None))}


@torch.no_grad()
def sum_of_blocks(layers, x, kwargs):
    """h = x + sum_i Attn_i(N1_i(x));  y = h + sum_i MLP_i(N2_i(h)), from the original modules."""
    h = x + sum(layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0] for layer in layers)
    return h + sum(layer.mlp(layer.post_attention_layernorm(h)) for layer in layers)


@torch.no_grad()
def grouped_reference_logits(model, input_ids, groups):
    """Logits of the model whose groups are replaced by their sum-of-blocks (a single block is itself)."""
    x = model.model.embed_tokens(input_ids)
    kwargs = layer_kwargs(model, x)
    for group in groups:
        x = sum_of_blocks([model.model.layers[i] for i in group], x, kwargs)
    return model.lm_head(model.model.norm(x))


def random_hidden(seed=0, shape=(2, 12, 64)):
    return 2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_norm_folding_is_exact(tmp_path, arch):
    runner = BlockwiseModel(make_model(tmp_path, arch))
    adapter, n = runner.adapter, names(runner.adapter)
    block = runner.load_block(1)
    state = block_state(block)
    assert not torch.allclose(state[f"{n['norm1']}.weight"], torch.ones(64)), "gammas must be random here"
    folded = fold_norms(state, adapter)
    assert torch.equal(folded[f"{n['norm1']}.weight"], torch.ones(64))
    assert torch.equal(folded[f"{n['norm2']}.weight"], torch.ones(64))
    assert torch.equal(folded[f"{n['o']}.weight"], state[f"{n['o']}.weight"])  # o/down do not read a norm
    x = random_hidden()
    kwargs = runner.block_kwargs(1, x)
    with torch.no_grad():
        expected = block(x, **kwargs)
        got = build_block(adapter, folded, 1, adapter.shape)(x, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", VARIANTS)
def test_flattened_group_is_sum_of_blocks(tmp_path, arch):
    model_dir = make_variant(tmp_path, arch)
    model = load_reference(model_dir)
    runner = BlockwiseModel(model_dir)
    adapter = runner.adapter
    group = [1, 2, 3]
    wide = flatten_group([block_state(runner.load_block(i)) for i in group], adapter)
    shape = widen(adapter.shape, len(group))
    check_block(wide, adapter, shape)
    layer = build_block(adapter, wide, group[0], shape)
    assert layer.self_attn.q_proj.weight.shape == (3 * 4 * 16, 64) and layer.mlp.down_proj.weight.shape == (64, 3 * 96)

    x = random_hidden(1)
    with torch.no_grad():
        got = layer(x, **runner.block_kwargs(group[0], x))
    expected = sum_of_blocks([model.model.layers[i] for i in group], x, layer_kwargs(model, x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is not the sequential composition it replaces
    with torch.no_grad():
        sequential = x
        for i in group:
            sequential = model.model.layers[i](sequential, **layer_kwargs(model, x))
    assert not torch.allclose(got, sequential, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-obias"])
def test_zero_padding_adds_nothing(tmp_path, arch):
    runner = BlockwiseModel(make_variant(tmp_path, arch))
    adapter, shape = runner.adapter, runner.adapter.shape
    x = random_hidden(2)
    kwargs = runner.block_kwargs(0, x)
    widest = widen(shape, 3)
    for group in ([0], [0, 1]):
        sources = [block_state(runner.load_block(i)) for i in group]
        block = sources[0] if len(group) == 1 else flatten_group(sources, adapter)
        own = widen(shape, len(group))
        padded = pad_block(block, adapter, own, widest)
        check_block(padded, adapter, widest)
        with torch.no_grad():
            expected = build_block(adapter, block, 0, own)(x, **kwargs)
            got = build_block(adapter, padded, 0, widest)(x, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_concat_refuses_unfolded_norms_and_check_block_names_the_problem(tmp_path):
    runner = BlockwiseModel(make_model(tmp_path, "llama"))
    adapter = runner.adapter
    states = [block_state(runner.load_block(i)) for i in (0, 1)]
    with pytest.raises(ValueError, match="folded norms"):
        concat_blocks(states, adapter)
    bad = dict(states[0])
    bad["self_attn.q_proj.weight"] = bad["self_attn.q_proj.weight"][:-3]
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        check_block(bad, adapter, adapter.shape)
    with pytest.raises(ValueError, match="do not divide"):
        check_block(states[0], adapter, replace(adapter.shape, num_kv_heads=3))
    with pytest.raises(ValueError, match="query heads per KV head"):
        pad_block(states[0], adapter, adapter.shape, replace(adapter.shape, num_heads=8))
