"""Inference speed and memory of dense and depth-compressed checkpoints, measured side by side.

Depth compression removes whole decoder layers, so its promise is a wall-clock speedup close to
L / (L - k) in both prefill (many tokens per forward) and decode (one token per forward with a KV
cache, which also shrinks by the same factor). This module measures what a checkpoint actually
delivers: all models are timed in one process in interleaved rounds, so the ratios between models
compare like with like (same threads, same clocks, same random prompt, same moment).

Prefill keeps only the last position's logits (`logits_to_keep=1`), as generation does: the
vocabulary projection over every prompt position is work a serving stack never does and depth
compression does not touch.

Resuming: with `state_dir`, each model's memory pass and every finished timed round are saved to
`state_dir/state.json` (keyed by the models, their fingerprints and every setting). A rerun after
an interruption reuses them, runs the warm-up rounds again (a fresh process is cold) and then only
the remaining timed rounds, continuing the same rotation of model order; the record's `resume`
says what was reused. The state directory is removed when the measurement is complete.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .blockwise import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def head_dim(config) -> int:
    """Per-head width: the config's explicit head_dim when set (Qwen3, Gemma...), else hidden / heads."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def kv_cache_bytes_per_token(config, dtype: str | torch.dtype) -> int:
    """Bytes of KV cache one token costs: K and V for every layer and key/value head.

    `config` is a transformers PretrainedConfig; models without grouped-query attention have as
    many key/value heads as attention heads.
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim(config) * element


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc/self/statm: pages, second field)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Peak RSS above the level at start, sampled from a background thread every `interval` seconds.

    The process's own high-water mark (VmHWM) cannot tell one model from the one before it, so the
    peak of each model's load and measurement is sampled instead. Torch releases the GIL inside
    its kernels, so the sampler keeps running while a forward pass does.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = _rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


# ----------------------------------------------------------------------------- resuming


class _Progress:
    """Memory passes and timed rounds finished so far, saved after each one when `state_dir` is set."""

    def __init__(self, state_dir: str | Path | None, key: str):
        self.state_dir, self.key = (Path(state_dir) if state_dir is not None else None), key
        self.footprints: dict[str, dict] = {}
        self.seconds: dict[str, dict[str, list[float]]] | None = None
        if self.state_dir is None:
            return
        try:
            state = json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state is not None and state.get("key") == self.key:
            self.footprints, self.seconds = state["footprints"], state["seconds"]
            return
        if state is not None:
            logger.info("discarding the resume state in %s: it was made for other models or settings", self.state_dir)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)

    def save(self) -> None:
        if self.state_dir is not None:
            from .provenance import write_json

            write_json(self.state_dir / "state.json",
                       {"key": self.key, "footprints": self.footprints, "seconds": self.seconds})

    def finish(self) -> None:
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- timing


def _timed_runs(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    """`warmup` untimed calls, then the seconds each of `repeats` calls reports."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def _clock(device: torch.device) -> Callable[[], float]:
    """perf_counter, after waiting for queued CUDA work so the time covers the kernels themselves.

    Every visible GPU is waited for: a model spread by a device map ends its forward on another
    GPU than the one it starts on (GPUs this process left idle return at once).
    """
    if device.type == "cuda":
        def now() -> float:
            for index in range(torch.cuda.device_count()):
                torch.cuda.synchronize(index)
            return time.perf_counter()
        return now
    return time.perf_counter


@torch.inference_mode()
def _prefill_seconds(model, input_ids: torch.Tensor, now: Callable[[], float]) -> float:
    started = now()
    model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return now() - started


@torch.inference_mode()
def _decode_seconds(model, input_ids: torch.Tensor, decode_tokens: int, now: Callable[[], float]) -> float:
    """Seconds to decode `decode_tokens` greedy tokens one at a time after an (untimed) fresh prefill."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    past, next_token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    started = now()
    for _ in range(decode_tokens):
        out = model(input_ids=next_token, past_key_values=past, use_cache=True)
        past, next_token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return now() - started


# ----------------------------------------------------------------------------- measurement


def _validate(model_dirs: dict, *, batch_size: int, prompt_len: int, decode_tokens: int, warmup: int,
              repeats: int) -> dict:
    """Check every argument before any model is loaded; return each model's config."""
    from transformers import AutoConfig

    for name, value, least in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                               ("decode_tokens", decode_tokens, 1), ("warmup", warmup, 0),
                               ("repeats", repeats, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not model_dirs:
        raise ValueError("model_dirs is empty; name at least one model directory")
    configs = {}
    for name, model_dir in model_dirs.items():
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"model_dirs[{name!r}] = {str(model_dir)!r} is not a checkpoint directory (no config.json)")
        config = AutoConfig.from_pretrained(model_dir)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and prompt_len + decode_tokens > limit:
            raise ValueError(f"prompt_len + decode_tokens = {prompt_len} + {decode_tokens} exceeds "
                             f"max_position_embeddings = {limit} of model_dirs[{name!r}]")
        configs[name] = config
    return configs


def _load(model_dir: str | Path, device: torch.device, dtype: torch.dtype, *, device_map: str | None = None,
          max_memory: dict | None = None):
    """The model on `device`, or spread over the node's GPUs by `device_map` (flattengpt.inference).

    With a device map, inputs belong on `inference.input_device(model)` and a CUDA clock must wait
    for every device the model uses (`inference.synchronize(model)`), not only `device`.
    """
    from .inference import load_causal_lm

    return load_causal_lm(model_dir, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)


def _prompt(config, batch_size: int, prompt_len: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)


def _footprint(model_dir: str | Path, config, *, device: torch.device, dtype: torch.dtype, batch_size: int,
               prompt_len: int, decode_tokens: int, seed: int, device_map: str | None = None,
               max_memory: dict | None = None) -> dict:
    """Size and peak memory of one model alone: load it, run one prefill and one decode, free it.

    Measured in a pass of its own, before any timing, so that the figure covers this model only
    (the timed rounds may hold several models at once) and no sampler thread runs while timing.
    """
    from .inference import device_map_summary, input_device

    cuda = device.type == "cuda"
    # a device map may use every visible GPU: peaks are summed over them (one GPU otherwise)
    gpus = list(range(torch.cuda.device_count())) if cuda and device_map is not None else [device]
    if cuda:
        torch.cuda.empty_cache()
        for gpu in gpus:
            torch.cuda.reset_peak_memory_stats(gpu)
        baseline = sum(torch.cuda.memory_allocated(gpu) for gpu in gpus)
    sampler = None if cuda else _RssSampler()
    with sampler or contextlib.nullcontext():
        model = _load(model_dir, device, dtype, device_map=device_map, max_memory=max_memory)
        input_ids = _prompt(config, batch_size, prompt_len, seed, input_device(model))
        now = _clock(device)
        _prefill_seconds(model, input_ids, now)
        _decode_seconds(model, input_ids, decode_tokens, now)
        record = {"model_dir": str(model_dir), "num_layers": int(model.config.num_hidden_layers),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "device_map": None if device_map is None else device_map_summary(model, device_map, max_memory)}
        del model
    gc.collect()
    if cuda:
        peak = (sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) - baseline) / MIB
        method = "cuda_max_allocated" if len(gpus) == 1 else "cuda_max_allocated_sum_over_gpus"
        torch.cuda.empty_cache()
    else:
        peak, method = sampler.increase_mib, "cpu_rss_increase"
    record.update(kv_cache_bytes_per_token=kv_cache_bytes_per_token(config, dtype), peak_memory_mib=peak,
                  memory_method=method)
    return record


def _rotations(names: list[str], rounds: int):
    """The model order of each round, rotated by one per round, so no model always runs first."""
    for index in range(rounds):
        shift = index % len(names)
        yield names[shift:] + names[:shift]


def _timings(model_dirs: dict, configs: dict, *, device: torch.device, dtype: torch.dtype, batch_size: int,
             prompt_len: int, decode_tokens: int, warmup: int, repeats: int, seed: int,
             interleave: bool, done: dict | None = None, device_map: str | None = None, max_memory: dict | None = None,
             on_round: Callable[[dict], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds of every timed prefill and decode run, per model.

    Interleaved, all models stay loaded and each round times every model once (prefill rounds,
    then decode rounds), so slow drift of the machine (clock boost, allocator and thread-pool
    warm-up, a neighbour's load) falls on all models alike. Measured on this CPU, the model timed
    first in a sequential schedule was ~10% slower than the same checkpoint timed again later,
    which moved the dense-to-compressed ratio above its ideal. Sequential (`interleave=False`)
    holds one model at a time, for models that do not fit on the device together.

    `done` holds the seconds of rounds finished before an interruption: those rounds are skipped
    (after the warm-up, which a fresh process needs again) and the rotation continues where it was;
    `on_round` gets the seconds so far after every timed round.
    """
    now = _clock(device)
    names = list(model_dirs)
    seconds = done or {name: {"prefill": [], "decode": []} for name in names}
    runs = {"prefill": lambda model, ids: _prefill_seconds(model, ids, now),
            "decode": lambda model, ids: _decode_seconds(model, ids, decode_tokens, now)}

    def timed(loaded: dict, order_names: list[str]) -> None:
        for kind, run in runs.items():
            finished = len(seconds[order_names[0]][kind])  # a round times every model in it, or none is saved
            if finished >= repeats:
                continue
            for order in _rotations(order_names, warmup):
                for name in order:
                    run(*loaded[name])
            for index, order in enumerate(_rotations(order_names, repeats)):
                if index < finished:
                    continue
                for name in order:
                    seconds[name][kind].append(run(*loaded[name]))
                if on_round is not None:
                    on_round(seconds)

    def ready(name: str) -> tuple:
        from .inference import input_device

        model = _load(model_dirs[name], device, dtype, device_map=device_map, max_memory=max_memory)
        return model, _prompt(configs[name], batch_size, prompt_len, seed, input_device(model))

    if interleave:
        loaded = {name: ready(name) for name in names}
        timed(loaded, names)
        del loaded
    else:
        for name in names:
            if all(len(seconds[name][kind]) >= repeats for kind in runs):
                continue  # measured before an interruption: not even loaded
            loaded = {name: ready(name)}
            timed(loaded, [name])
            del loaded
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    gc.collect()
    return seconds


def measure_speed(model_dirs: dict[str, str | Path], *, device: str = "cpu", dtype: str = "float32",
                  batch_size: int = 1, prompt_len: int = 256, decode_tokens: int = 32, warmup: int = 2,
                  repeats: int = 5, seed: int = 0, interleave: bool = True, state_dir: str | Path | None = None,
                  resume_key: str | None = None, device_map: str | None = None, max_memory: dict | None = None) -> dict:
    """Prefill throughput, decode latency (KV cache on) and peak memory of each named checkpoint.

    Every model runs on the same seeded random prompt of `batch_size` x `prompt_len` token ids;
    decode starts from a fresh prefill of that prompt and times `decode_tokens` greedy steps.
    Peak memory comes from a first pass that holds one model at a time; the timings from `warmup`
    untimed and `repeats` timed rounds, interleaved across models unless `interleave` is False.
    Figures are medians over the timed runs. When one model is named "dense", every other model
    gets its speedups over it beside the ideal L_dense / L_model.
    With `state_dir`, finished parts are saved and a rerun resumes (module docstring); `resume_key`
    (e.g. a hash of the checkpoints' fingerprints) must change whenever a checkpoint does.
    """
    if not isinstance(interleave, bool):
        raise ValueError(f"interleave must be true or false, got {interleave!r}")
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    from .inference import normalize_max_memory, placement_kwargs

    placement_kwargs(torch_device, device_map, max_memory)  # refuses a bad request before any model loads
    configs = _validate(model_dirs, batch_size=batch_size, prompt_len=prompt_len, decode_tokens=decode_tokens,
                        warmup=warmup, repeats=repeats)
    settings = {"device": str(torch_device), "dtype": str(torch_dtype).removeprefix("torch."),
                "batch_size": batch_size, "prompt_len": prompt_len, "decode_prompt_len": prompt_len,
                "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats, "seed": seed,
                "schedule": "interleaved" if interleave else "sequential",
                "prefill_logits_to_keep": 1, "torch_threads": torch.get_num_threads(), "device_map": device_map,
                "max_memory": None if max_memory is None else {str(k): v for k, v in normalize_max_memory(max_memory).items()},
                "torch_version": torch.__version__}
    shape = dict(device=torch_device, dtype=torch_dtype, batch_size=batch_size, prompt_len=prompt_len,
                 decode_tokens=decode_tokens, seed=seed, device_map=device_map, max_memory=max_memory)
    from .provenance import json_sha256

    progress = _Progress(state_dir, json_sha256({"settings": settings, "resume_key": resume_key,
                                                 "model_dirs": {k: str(v) for k, v in model_dirs.items()}}))
    # What an interrupted run had finished; the same fields, all empty, in an uninterrupted run.
    done = progress.seconds or {}
    reused = {"memory_pass": [name for name in model_dirs if name in progress.footprints],
              "timed_runs": {name: {kind: len(done.get(name, {}).get(kind, [])) for kind in ("prefill", "decode")}
                             for name in model_dirs}}
    reused["resumed"] = bool(reused["memory_pass"]) or any(n for runs in reused["timed_runs"].values()
                                                            for n in runs.values())
    if reused["resumed"]:
        logger.info("resuming from saved progress in %s: memory pass of %s reused, timed runs done %s (of %d)",
                    state_dir, ", ".join(reused["memory_pass"]) or "no model", reused["timed_runs"], repeats)
    models = {}
    if torch_device.type == "cpu" and len(progress.footprints) < len(model_dirs):
        # The first model loaded in a process pays one-time costs (thread pools, allocator arenas,
        # lazy library state) that an RSS increase charges to it: the same SmolLM2 checkpoint
        # measured 648 MiB first and 565 MiB second. One discarded pass takes them out.
        first = next(iter(model_dirs))
        _footprint(model_dirs[first], configs[first], **shape)
    for name, model_dir in model_dirs.items():
        if name in progress.footprints:
            models[name] = dict(progress.footprints[name])
            continue
        models[name] = _footprint(model_dir, configs[name], **shape)
        progress.footprints[name] = dict(models[name])
        progress.save()
        logger.info("%s: %d layers, %d parameters, peak memory %.1f MiB (%s)", name, models[name]["num_layers"],
                    models[name]["parameters"], models[name]["peak_memory_mib"], models[name]["memory_method"])
    logger.info("timing %d warm-up and %d timed rounds, %s", warmup, repeats, settings["schedule"])
    def saved(seconds: dict) -> None:
        progress.seconds = seconds
        progress.save()

    seconds = _timings(model_dirs, configs, warmup=warmup, repeats=repeats, interleave=interleave,
                       done=progress.seconds, on_round=saved, **shape)
    for name, record in models.items():
        prefill_tps = [batch_size * prompt_len / s for s in seconds[name]["prefill"]]
        decode_ms = [s / decode_tokens * 1000 for s in seconds[name]["decode"]]
        record.update(prefill_tokens_per_s=statistics.median(prefill_tps), prefill_tokens_per_s_runs=prefill_tps,
                      decode_ms_per_token=statistics.median(decode_ms), decode_ms_per_token_runs=decode_ms)
        logger.info("%s: prefill %.1f tokens/s, decode %.3f ms/token", name, record["prefill_tokens_per_s"],
                    record["decode_ms_per_token"])
    result = {"settings": settings, "models": models, "resume": reused}
    if "dense" in models:
        dense = models["dense"]
        result["ratios"] = {
            name: {"prefill_speedup": record["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
                   "decode_speedup": dense["decode_ms_per_token"] / record["decode_ms_per_token"],
                   "ideal_speedup": dense["num_layers"] / record["num_layers"]}
            for name, record in models.items() if name != "dense"
        }
    progress.finish()
    return result


# ----------------------------------------------------------------------------- generations


@torch.inference_mode()
def generate_samples(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48) -> list[dict]:
    """Greedy completions of `prompts` by a loaded model, one prompt at a time (see sample_generations)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    from .inference import input_device

    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    device = input_device(model)  # the embedding's device: the model's only one unless a device map spreads it
    samples = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
        new_tokens = output[0, encoded["input_ids"].shape[1]:]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
                        "n_new_tokens": int(new_tokens.numel())})
    return samples


def sample_generations(model_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 48,
                       device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
                       max_memory: dict | None = None) -> list[dict]:
    """Greedy completions of fixed prompts: a qualitative look at what compression did to the text.

    Prompts run one at a time, so no padding side or attention-mask subtleties enter; greedy
    decoding makes the output a deterministic function of the checkpoint. `device_map` and
    `max_memory` spread the model over several devices (flattengpt.inference.load_causal_lm).
    """
    from transformers import AutoTokenizer

    from .inference import load_causal_lm

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    return generate_samples(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
