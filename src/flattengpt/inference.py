"""Loading a checkpoint for evaluation: on one device, or spread over the GPUs of a node.

Speed, generation and zero-shot evaluation all load through `load_causal_lm`. Without a device map
it does what they always did: `from_pretrained` on the CPU, then `.to(device)`. With
`evaluation.device_map` (auto, balanced, balanced_low_0 or sequential) the model is loaded by
accelerate straight onto the devices it is split over, capped per device by `evaluation.max_memory`
(`{0: 70GiB, 1: 70GiB, cpu: 200GiB}`; accelerate's own estimate where unset): a 70B model in
bfloat16 then runs on two 80 GB GPUs where it cannot fit on one.

The device map spreads over the devices `compute.device` allows: `cuda` (or `auto` on a GPU node,
or `cuda:N`) means every visible GPU (CUDA_VISIBLE_DEVICES, which Slurm sets to the GPUs of the
job), plus the CPU where accelerate needs it or `max_memory` names it; `cpu` keeps the whole model
on the CPU (the map is honoured, and is the trivial one), so a config that asks for a device map
runs unchanged on a CPU-only machine. `device_map_summary` records which map was actually used.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch

from .blockwise import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_name(device) -> str:
    """An hf_device_map value (GPU index, "cpu", "disk", torch.device) as one name: cuda:0, cpu, disk."""
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def normalize_max_memory(max_memory: dict | None) -> dict | None:
    """`evaluation.max_memory` as accelerate takes it: GPU index (int) or "cpu" -> bytes or a size string.

    Keys may be written 0, "0" or "cuda:0"; values an integer of bytes or a string such as "70GiB".
    """
    if max_memory is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"evaluation.max_memory must be a non-empty map from device to size "
                         f"(e.g. {{0: 70GiB, 1: 70GiB, cpu: 200GiB}}), got {max_memory!r}")
    normalized = {}
    for key, value in max_memory.items():
        name = str(key)
        match = re.fullmatch(r"(?:cuda:)?(\d+)", name)
        if name == "cpu":
            device = "cpu"
        elif match:
            device = int(match.group(1))
        else:
            raise ValueError(f"evaluation.max_memory: device {key!r} is neither a GPU index (0, 1, ... or cuda:0) "
                             "nor cpu")
        if device in normalized:
            raise ValueError(f"evaluation.max_memory names device {_device_name(device)} twice")
        try:
            if isinstance(value, bool) or convert_file_size_to_int(value) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"evaluation.max_memory.{key}: {value!r} is not a positive size (bytes, or a string "
                             "such as 70GiB)") from None
        normalized[device] = value
    return normalized


def placement_kwargs(device: str | torch.device, device_map: str | None = None,
                     max_memory: dict | None = None) -> dict:
    """The `from_pretrained` arguments that place the model: {} without a device map.

    Raises ValueError naming the config field when the request cannot be honoured.
    """
    if device_map is None:
        if max_memory is not None:
            raise ValueError("evaluation.max_memory is set but evaluation.device_map is null: max_memory only "
                             f"caps the devices of a device map; set evaluation.device_map to one of {DEVICE_MAPS}")
        return {}
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"evaluation.device_map must be null or one of {DEVICE_MAPS}, got {device_map!r}")
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    memory = normalize_max_memory(max_memory)
    if device.type == "cpu":
        gpus = sorted(k for k in memory or {} if k != "cpu")
        if gpus:
            raise ValueError(f"evaluation.max_memory names GPU(s) {gpus} but compute.device is cpu; drop them "
                             "(only cpu may be capped) or set compute.device to cuda")
        # Only the CPU is offered, so accelerate maps everything there even on a node with GPUs.
        if memory is None:
            from accelerate.utils import get_max_memory

            memory = {"cpu": get_max_memory()["cpu"]}
    elif device.type == "cuda":
        visible = torch.cuda.device_count()
        beyond = sorted(k for k in memory or {} if k != "cpu" and k >= visible)
        if beyond:
            raise ValueError(f"evaluation.max_memory names GPU(s) {beyond} but only {visible} GPU(s) are visible "
                             "(indices count from 0 within CUDA_VISIBLE_DEVICES)")
    else:
        raise ValueError(f"evaluation.device_map needs compute.device cpu or cuda, not {str(device)!r}")
    return {"device_map": device_map, "max_memory": memory}


def load_causal_lm(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                   device_map: str | None = None, max_memory: dict | None = None,
                   attn_implementation: str | None = "sdpa"):
    """A causal LM in eval mode: on `device`, or spread by `device_map` (see the module docstring).

    `attn_implementation=None` leaves transformers' default, as lm-eval's own loading does.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    placement = placement_kwargs(torch_device, device_map, max_memory)
    kwargs = {"dtype": resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not placement:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        return model.to(torch_device).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs, **placement).eval()
    summary = device_map_summary(model, device_map, max_memory)
    log.info("device map %s over %s: decoder layers per device %s", device_map, ", ".join(summary["devices"]),
             summary["layers_per_device"])
    offloaded = sorted({"cpu", "disk"} & set(summary["devices"]))
    if torch_device.type != "cpu" and offloaded:
        log.warning("device map %s offloads part of %s to %s: it runs, but slowly (raise evaluation.max_memory "
                    "or ask for more GPUs)", device_map, model_dir, " and ".join(offloaded))
    return model


def input_device(model) -> torch.device:
    """Where input ids go: the device of the token embedding."""
    return model.get_input_embeddings().weight.device


def _decoder_layers(model) -> tuple[str, torch.nn.ModuleList] | tuple[None, None]:
    """The decoder layer list (qualified name, modules): the ModuleList with num_hidden_layers entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    return None, None


def _module_device(model, name: str | None, module: torch.nn.Module) -> str:
    """The device a module runs on: its entry in hf_device_map (so "disk" for offloaded ones), else its weights'."""
    device_map = getattr(model, "hf_device_map", None) or {}
    matches = [key for key in device_map
               if name is not None and (key == "" or name == key or name.startswith(key + "."))]
    if matches:
        return _device_name(device_map[max(matches, key=len)])
    tensor = next(module.parameters(), None)
    return str(tensor.device) if tensor is not None else "none"


def used_devices(model) -> list[str]:
    """Every device holding part of the model, in module order."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        names = [_device_name(value) for value in device_map.values()]
    else:
        names = [str(p.device) for p in model.parameters()]
    return list(dict.fromkeys(names))


def synchronize(model_or_devices) -> None:
    """Wait for the queued CUDA work of every GPU a model (or a list of devices) uses; nothing on CPU."""
    devices = used_devices(model_or_devices) if isinstance(model_or_devices, torch.nn.Module) else model_or_devices
    for device in devices:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def device_map_summary(model, requested: str | None = None, max_memory: dict | None = None) -> dict:
    """What a result's record keeps of the placement: devices, decoder layers per device, input and output device.

    `requested` and `max_memory` are the config's evaluation.device_map and evaluation.max_memory.
    """
    max_memory = normalize_max_memory(max_memory)
    name, layers = _decoder_layers(model)
    per_layer = [_module_device(model, f"{name}.{index}", layer) for index, layer in enumerate(layers or [])]
    output = model.get_output_embeddings()
    names = {id(module): qualified for qualified, module in model.named_modules()}
    return {
        "requested": requested,
        "max_memory": None if max_memory is None else {_device_name(k): v for k, v in max_memory.items()},
        "devices": used_devices(model),
        "layers_per_device": dict(Counter(per_layer)),
        "input_device": str(input_device(model)),
        "output_device": None if output is None else _module_device(model, names.get(id(output)), output),
        # accelerate hooks move activations between devices (only when the map has more than one)
        "dispatched": bool(getattr(model, "hf_device_map", None)),
    }
