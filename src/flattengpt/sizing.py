"""What each heavy stage needs (GPU memory, host memory, disk, GPUs, runtime), from config.json alone.

No weights are read and torch is not imported: the workflow's resource function (Snakemake's
`resources:`) and `flattengpt resources CONFIG_JSON` call this before a model is downloaded.

Notation (every figure in bytes): L blocks, H hidden, I intermediate, q = heads * head_dim,
kv = kv_heads * head_dim, V vocabulary, P_b parameters of one block, P the model's parameters;
n x T calibration tokens, b the batch size (sequences), c the compute dtype's bytes (compute.dtype),
s the stored activations' bytes (activations.store_dtype), w the checkpoint's own dtype's bytes.

Parameters (exact, each stored tensor once):
    P_b = H*q + 2*H*kv + q*H + 3*H*I + 2*H      (+ q + 2*kv q/k/v biases, + H o_proj bias where the config has them)
    P   = L*P_b + V*H (embedding) + H (final norm) + V*H (lm_head, unless tied)

One block's forward on t = b*T tokens (`block_working`), the tensors alive at once under no_grad:
    attention phase  t*c*(4*H + 3*q + 2*kv + 2*q)   input, residual, norm, o_proj out; q, rope'd q,
                                                    attention out; k, v; k, v repeated to all heads
    MLP phase        t*c*(4*H + 3*m*I)              input, residual, norm, down out; silu(gate), up, product
    block_working  = max of the two, + T*T*c for the causal mask (sdpa's fused CUDA kernels need no T x T
                     scores; on the CPU + b*heads*T*T*c scores, and the block's mapped file pages P_b*w)

Stages (the code they follow is named; "2 copies" = the running hidden state and the buffer the
next block writes into, `BlockwiseModel.run_block`):
    activations  device  max(V*H*c, P_b*c + block_working(b*T))         one block resident (blockwise.py)
                 host    2 * n*T*H*c                                    2 copies of X_l (residual_stream)
                 disk    (L+1) * n*T'*H*s + 2 * n*T*H*c                  layer files + resume state (old and new
                                                                        while it is rewritten atomically);
                                                                        T' = T, or max(1, max_tokens // n)
    search       device  max(V*H*c + 512*V*4, P_b*c + block_working(b*T)) SLEB, the costliest search (methods/sleb.py):
                 host    3 * n*T*H*c                                    the running stream, a trial's stream and its
                                                                        output; k rounds of L(L-1)/2 + L forwards
                                                                        (LaCo, SLM: a few samples, far less;
                                                                        flattengpt plan_criterion trial_error:
                                                                        one pair's compress memory + 3 copies,
                                                                        L forwards + L-1 trial compressions)
    compress     device  group_memory_bytes(...)["device"]              methods/flattengpt.py, one group of m blocks
                 host    group_memory_bytes(...)["host"]                 2 copies of the hidden state included
                 (replaceme: device (k+1)*P_b*c + block_working + 6*H^2*8, host 2 * n*T*H*c; drop, shortgpt,
                 gromov, sleb, laco, slm: copies and sums, 2*m*P_b*c)
                 disk    (P - k*P_b)*w + 2 * n*T*H*c                     compressed checkpoint + resume hidden
                                                                        (the next one is written before the last
                                                                        is deleted)
    perplexity   device  max(V*H*c + 512*V*4, P_b*c + block_working(b*T)) blockwise; logits 512 positions at a time
                 host    2 * N'*T*H*c                                   N' = min(checkpoint_every, N) windows a
                                                                        pass; N = max_windows, else 256 assumed
    similarity   (CPU)   host 2 * 256 MiB chunk + CKA (L+1)*min(n'^2, n'*H)*8 with n' = cka_max_tokens
    zero_shot    device  P*c + KV(b*X) + block_working(b*X) + 2*b*X*V*c  whole model (lm-eval HFLM);
                                                                        X = 512 tokens assumed per request
    speed        device  (P + P')*c + KV + block_working(b*T_p)         dense and compressed both loaded
                                                                        (interleave), one at a time otherwise
    generate     device  P*c + KV + block_working                       whole model, greedy decoding
    KV(t)      = 2 * L * kv * c * t
Whole-model stages load the weights on the host first (from_pretrained, then .to(device)): host >= P*c.

Margins: device x 1.10 (caching-allocator fragmentation) + 1 GiB (CUDA context, cuBLAS/cuSOLVER
workspaces); host x 1.10 + 3 GiB (interpreter, torch, transformers, CUDA host libraries).
On compute.device cpu the device figure is added to the host's and no GPU is asked for.
GPUs: blockwise stages and compress use exactly one device; the whole-model stages need
ceil(device / per-GPU memory) GPUs (cluster.gpu_memory_gb).

Runtime (minutes) is a throughput estimate, not a measurement: FLOPs at the assumed sustained rates
below plus bytes at the assumed disk and host<->device bandwidths, x RUNTIME_SAFETY, at least the
stage's floor, x the attempt number on retries.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

# Margins (see the module docstring).
DEVICE_CONTEXT = 1 * GIB
DEVICE_SLACK = 1.10
HOST_BASE = 3 * GIB
HOST_SLACK = 1.10

# Data-dependent sizes that config.json and the config cannot give before the data is read.
ASSUMED_EVAL_WINDOWS = 256  # perplexity windows when max_windows is null (GPTQ's C4 protocol: 256 x 2048)
ASSUMED_TASK_TOKENS = 512  # longest zero-shot request (context + continuation) of the paper's five tasks
ASSUMED_TASK_REQUESTS = 40_000  # the largest paper task, HellaSwag: 10042 items x 4 endings
ASSUMED_TASK_MEAN_TOKENS = 128  # mean request length, for the runtime estimate only
LOGIT_CHUNK = 512  # BlockwiseModel.next_token_nll forms logits this many positions at a time
SIMILARITY_CHUNK = 256 * MIB  # similarity.DEFAULT_MEMORY_MB, two float64 copies alive
GENERATION_PROMPT_TOKENS = 64  # the fixed prompts are a few words each

# Assumed sustained throughputs for the runtime estimate (deliberately below an A100's peaks).
GPU_FLOPS = {"float32": 15e12, "float16": 100e12, "bfloat16": 100e12, "float64": 8e12}
CPU_FLOPS_PER_THREAD = 30e9
DISK_BYTES_PER_S = 300e6
HOST_DEVICE_BYTES_PER_S = 5e9
RUNTIME_SAFETY = 2.0
RUNTIME_FLOOR = {"activations": 120, "search": 240, "compress": 240, "perplexity": 120, "zero_shot": 240, "speed": 60,
                 "generate": 30, "similarity": 30, "recover": 120}
STAGES = ("activations", "similarity", "search", "compress", "perplexity", "zero_shot", "speed", "generate")
# recover sizes a recovery (LoRA) job; not in the README's table of the default pipeline
SIZED_STAGES = STAGES + ("recover",)
GPU_STAGES = ("activations", "search", "compress", "perplexity", "zero_shot", "speed", "generate", "recover")
ASSUMED_RECOVERY_EXAMPLES = 50_000  # epochs x examples when max_steps is unset: the paper's cleaned Alpaca
WHOLE_MODEL_STAGES = ("zero_shot", "speed", "generate")

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class SizingError(ValueError):
    pass


# ----------------------------------------------------------------------------- public configs

# config.json of the LLaMA-2 base models (meta-llama/Llama-2-{7b,13b,70b}-hf), the shape fields.
_LLAMA2_COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
                  "torch_dtype": "float16", "vocab_size": 32000}
LLAMA2_CONFIGS = {
    "LLaMA-2-7B": {**_LLAMA2_COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_hidden_layers": 32, "num_key_value_heads": 32},
    "LLaMA-2-13B": {**_LLAMA2_COMMON, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                    "num_hidden_layers": 40, "num_key_value_heads": 40},
    "LLaMA-2-70B": {**_LLAMA2_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_hidden_layers": 80, "num_key_value_heads": 8},
}
# The paper's targets for them (METHOD.md section 2): fraction of all parameters removed.
PAPER_RATIOS = {"LLaMA-2-7B": 0.21, "LLaMA-2-13B": 0.24, "LLaMA-2-70B": 0.20}
# Used when a model's config.json is not available yet (a hub model not downloaded): dry runs show these.
FALLBACK_CONFIG = LLAMA2_CONFIGS["LLaMA-2-7B"]


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shapes:
    """The shapes of a decoder from its config.json (Llama, Mistral, Qwen2 families)."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    weight_dtype: str  # the checkpoint's own dtype (torch_dtype / dtype in config.json)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.json") -> Shapes:
        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SizingError(f"{where}: {key} is {value!r}; a positive integer is needed to size the model "
                                  "(give the model's full config.json)")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # Absent fields are derived as the transformers config classes do (adapters.ModelAdapter.shape).
        head_dim = config.get("head_dim") or hidden // heads
        model_type = config.get("model_type") or "llama"
        bias = bool(config.get("attention_bias", False))
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        if dtype not in DTYPE_BYTES:
            raise SizingError(f"{where}: torch_dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        return cls(
            model_type=model_type, num_layers=need("num_hidden_layers"), hidden=hidden,
            intermediate=need("intermediate_size"), heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads, head_dim=int(head_dim),
            vocab=need("vocab_size"),
            # False is the default of LlamaConfig, MistralConfig and Qwen2Config
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else bias,  # Qwen2 always has q/k/v biases (adapters.py)
            o_bias=False if model_type == "qwen2" else bias,
            weight_dtype=dtype,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def block_params(self) -> int:
        H, q, kv, I = self.hidden, self.q_width, self.kv_width, self.intermediate
        params = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H
        params += (q + 2 * kv) if self.qkv_bias else 0
        params += H if self.o_bias else 0
        return params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def non_block_params(self) -> int:
        return self.embedding_params * (1 if self.tied else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return self.num_layers * self.block_params + self.non_block_params

    def kv_cache_bytes(self, tokens: int, dtype_bytes: int, num_layers: int | None = None) -> int:
        """K and V of every layer and KV head for `tokens` positions (speed.kv_cache_bytes_per_token)."""
        return 2 * (num_layers or self.num_layers) * self.kv_width * dtype_bytes * tokens

    def remove_blocks_for(self, ratio: float) -> int:
        """k = round(ratio * P / P_b), as plan.py counts a ratio target."""
        return round(ratio * self.total_params / self.block_params)


# ----------------------------------------------------------------------------- settings


def schema_defaults(schema_path: str | Path | None = None) -> dict:
    """The workflow config that the schema's defaults alone give (models, calibration, targets empty)."""
    import jsonschema
    import yaml

    from .config import _with_defaults

    path = Path(schema_path or SCHEMA)
    if not path.is_file():
        raise SizingError(f"{path}: the workflow schema is needed for the defaults; run from the repository or "
                          "pass the workflow config")
    schema = yaml.safe_load(path.read_text())
    config: dict = {}
    validator = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    for _ in validator.iter_errors(config):  # `required` errors only: models etc. are not given here
        pass
    calibration = schema["definitions"]["calibration"]["properties"]
    config["_calibration_defaults"] = {key: calibration[key]["default"] for key in ("n_samples", "seq_len")}
    return config


@functools.lru_cache(maxsize=1)
def _calibration_defaults() -> dict:
    """The schema's n_samples and seq_len (read once: every job's resources need them)."""
    return dict(schema_defaults()["_calibration_defaults"])


@dataclass(frozen=True)
class Settings:
    """Everything the sizing reads from the workflow config (see `from_config`)."""

    device: str
    dtype: str
    batch_size: int
    threads: int
    n_samples: int
    seq_len: int
    store_dtype: str
    max_tokens: int | None
    method: str
    compensation_target: str
    eval_dtype: str
    zero_shot_dtype: str
    ppl_seq_len: int
    ppl_batch_size: int
    ppl_windows: int
    zero_shot_batch_size: int
    speed_enabled: bool
    speed_batch_size: int
    prompt_len: int
    decode_tokens: int
    interleave: bool
    max_new_tokens: int
    cka_max_tokens: int
    gpu_memory_bytes: int
    ppl_windows_per_pass: int | None = None  # evaluation.perplexity.checkpoint_every
    device_map: str | None = None  # evaluation.device_map: whole-model stages spread over the job's GPUs
    lambda_factor: float | str = 10.0  # or "auto"
    plan_criterion: str = "cosine"  # methods.<name>.plan_criterion of flattengpt: trial_error searches
    recovery: dict | None = None  # a recovery: entry (stage recover)
    solve_device: str = "auto"  # methods.<name>.solve_device: auto (where the Gram sums are) or host
    remove_blocks: int | None = None  # k; None: unknown (then no blocks are counted as removed)
    group_size: int = 2  # m, blocks per flattened group
    search_samples: int | None = None  # methods.<name>.samples of a search (SLEB: null = all; LaCo/SLM: 10)
    search_sample_len: int | None = None  # methods.<name>.sample_len (LaCo/SLM; SLEB: the whole windows)

    @classmethod
    def from_config(cls, config: Mapping, *, calibration: Mapping | None = None, method: Mapping | None = None,
                    **overrides) -> Settings:
        """From a (schema-validated, defaults filled) workflow config; `calibration` and `method` are entries
        of its calibration and methods sections (defaults: the schema's)."""
        compute, evaluation = config["compute"], config["evaluation"]
        calibration = calibration or config.get("_calibration_defaults") or _calibration_defaults()
        method = method or {"method": "flattengpt", "compensation_target": "flattened"}
        perplexity, zero_shot, speed = evaluation["perplexity"], evaluation["zero_shot"], evaluation["speed"]
        eval_dtype = evaluation["dtype"] or compute["dtype"]
        batch = zero_shot["batch_size"]
        values = dict(
            device=compute["device"], dtype=compute["dtype"], batch_size=compute["batch_size"],
            threads=compute["threads"], n_samples=calibration["n_samples"], seq_len=calibration["seq_len"],
            store_dtype=config["activations"]["store_dtype"], max_tokens=config["activations"]["max_tokens"],
            method=method["method"], compensation_target=method.get("compensation_target", "flattened"),
            lambda_factor=method.get("lambda_factor", 10.0), solve_device=method.get("solve_device", "auto"),
            plan_criterion=method.get("plan_criterion", "cosine"),
            eval_dtype=eval_dtype, zero_shot_dtype=zero_shot["dtype"] or eval_dtype,
            ppl_seq_len=perplexity["seq_len"], ppl_batch_size=perplexity["batch_size"],
            ppl_windows=perplexity["max_windows"] or ASSUMED_EVAL_WINDOWS,
            # "auto": lm-eval grows the batch to what fits; sized for one sequence
            zero_shot_batch_size=batch if isinstance(batch, int) else 1,
            speed_enabled=speed["enabled"], speed_batch_size=speed["batch_size"], prompt_len=speed["prompt_len"],
            decode_tokens=speed["decode_tokens"], interleave=speed["interleave"],
            max_new_tokens=evaluation["generation"]["max_new_tokens"],
            cka_max_tokens=config["similarity"]["cka_max_tokens"],
            gpu_memory_bytes=int(config["cluster"]["gpu_memory_gb"] * GIB),
            ppl_windows_per_pass=perplexity.get("checkpoint_every"),
            device_map=evaluation.get("device_map"),
            search_samples=method.get("samples"), search_sample_len=method.get("sample_len"),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def on_gpu(self) -> bool:
        """auto and cuda* run on a GPU where the cluster gives one; cpu never does."""
        return self.device != "cpu"

    @property
    def stored_tokens(self) -> int:
        """n * T': activations.select_positions keeps max(1, max_tokens // n) positions per sequence."""
        n, T = self.n_samples, self.seq_len
        if self.max_tokens is None or self.max_tokens >= n * T:
            return n * T
        return n * max(1, self.max_tokens // n)


def default_settings(**overrides) -> Settings:
    return Settings.from_config(schema_defaults(), **overrides)


# ----------------------------------------------------------------------------- memory terms


def block_working_bytes(shapes: Shapes, tokens: int, seq_len: int, c: int, m: int = 1, cpu: bool = False) -> int:
    """Tensors alive at once in one (m-wide) block's forward on `tokens` tokens (module docstring).

    On the CPU, sdpa with an explicit mask materialises the attention scores (b * heads * T * T),
    which CUDA's fused kernels never hold: measured, see tests/test_sizing.py.
    """
    H, q, kv, I = shapes.hidden, m * shapes.q_width, m * shapes.kv_width, m * shapes.intermediate
    attention = tokens * c * (4 * H + 3 * q + 2 * kv + 2 * q)
    if cpu:
        attention += (tokens // seq_len) * m * shapes.heads * seq_len * seq_len * c
    mlp = tokens * c * (4 * H + 3 * I)
    return max(attention, mlp) + seq_len * seq_len * c


def group_memory(shapes: Shapes, settings: Settings, group_size: int) -> dict:
    """Peak {"device", "host"} bytes of compressing one group of m blocks: methods.flattengpt.group_memory_bytes."""
    from .adapters import BlockShape
    from .methods.flattengpt import group_memory_bytes

    shape = BlockShape(hidden_size=shapes.hidden, num_heads=shapes.heads, num_kv_heads=shapes.kv_heads,
                       head_dim=shapes.head_dim, intermediate_size=shapes.intermediate, qkv_bias=shapes.qkv_bias,
                       o_bias=shapes.o_bias)
    return group_memory_bytes(shape, group_size, compute_dtype_bytes=DTYPE_BYTES[settings.dtype],
                              batch_size=settings.batch_size, seq_len=settings.seq_len,
                              compensation_target=settings.compensation_target, solve_device=settings.solve_device,
                              n_samples=settings.n_samples, source_dtype_bytes=DTYPE_BYTES[shapes.weight_dtype],
                              lambda_factor=settings.lambda_factor, device="cuda" if settings.on_gpu else "cpu")


# ----------------------------------------------------------------------------- per stage


@dataclass(frozen=True)
class Need:
    """What one job of a stage needs; bytes, minutes."""

    stage: str
    device_bytes: int  # on one GPU for blockwise stages, in all for whole-model stages; 0 on the CPU
    host_bytes: int
    disk_bytes: int
    gpus: int
    minutes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def mem_mb(self) -> int:
        return max(1000, math.ceil(self.host_bytes / MIB))

    @property
    def disk_mb(self) -> int:
        return max(1000, math.ceil(self.disk_bytes / MIB))


def _forward_flops(shapes: Shapes, tokens: int, seq_len: int, num_layers: int | None = None, m: int = 1) -> float:
    """2 FLOPs per weight per token, plus causal attention (QK^T and AV: 2*T*q per token, halved)."""
    layers = num_layers if num_layers is not None else shapes.num_layers
    return layers * tokens * (2 * m * shapes.block_params + 2 * seq_len * m * shapes.q_width)


def _minutes(stage: str, settings: Settings, flops: float, bytes_moved: float, attempt: int,
             flops_dtype: str | None = None, fp64_flops: float = 0.0) -> int:
    if settings.on_gpu:
        seconds = flops / GPU_FLOPS[flops_dtype or settings.dtype] + fp64_flops / GPU_FLOPS["float64"]
    else:
        seconds = (flops + fp64_flops) / (CPU_FLOPS_PER_THREAD * settings.threads)
    seconds += bytes_moved / DISK_BYTES_PER_S
    estimate = math.ceil(RUNTIME_SAFETY * seconds / 60)
    return max(RUNTIME_FLOOR[stage], estimate) * attempt


def _finish(stage: str, settings: Settings, device: int, host: int, disk: int, minutes: int, whole_model: bool,
            notes: list[str]) -> Need:
    if not settings.on_gpu or stage == "similarity":  # everything lives on the host
        return Need(stage, 0, math.ceil((host + device) * HOST_SLACK) + HOST_BASE, disk, 0, minutes, tuple(notes))
    device = math.ceil(device * DEVICE_SLACK) + DEVICE_CONTEXT
    gpus = max(1, math.ceil(device / settings.gpu_memory_bytes)) if whole_model else 1
    if not whole_model and device > settings.gpu_memory_bytes:
        notes.append(f"{stage}: needs {device / GIB:.0f} GiB on one GPU, more than cluster.gpu_memory_gb = "
                     f"{settings.gpu_memory_bytes / GIB:.0f}; lower compute.batch_size or use a larger GPU")
    if whole_model and gpus > 1 and settings.device_map is None:
        notes.append(f"{stage}: needs {gpus} GPUs of {settings.gpu_memory_bytes / GIB:.0f} GiB; set "
                     "evaluation.device_map: auto to spread the model over them (null loads it on one device)")
    return Need(stage, device, math.ceil(host * HOST_SLACK) + HOST_BASE, disk, gpus, minutes, tuple(notes))


def stage_need(stage: str, shapes: Shapes, settings: Settings, attempt: int = 1) -> Need:
    """GPU memory, host memory, disk, GPUs and runtime of one job of `stage` (formulas: module docstring)."""
    if stage not in SIZED_STAGES:
        raise SizingError(f"stage {stage!r} is not one of {', '.join(SIZED_STAGES)}")
    n, T, b = settings.n_samples, settings.seq_len, settings.batch_size
    c, s, w = DTYPE_BYTES[settings.dtype], DTYPE_BYTES[settings.store_dtype], DTYPE_BYTES[shapes.weight_dtype]
    H, L, V = shapes.hidden, shapes.num_layers, shapes.vocab
    hidden_state = n * T * H * c  # one copy of X_l over the calibration set
    k = settings.remove_blocks or 0
    notes: list[str] = []

    cpu = not settings.on_gpu
    if stage == "activations":
        # on the CPU the block's file pages (mmap) and its loaded tensors are both resident
        block = shapes.block_params * (c + (w if cpu else 0))
        device = max(V * H * c, block + block_working_bytes(shapes, b * T, T, c, cpu=cpu))
        host = 2 * hidden_state
        disk = (L + 1) * settings.stored_tokens * H * s + 2 * hidden_state
        moved = disk + L * shapes.block_params * w + 2 * L * hidden_state * (DISK_BYTES_PER_S / HOST_DEVICE_BYTES_PER_S)
        minutes = _minutes(stage, settings, _forward_flops(shapes, n * T, T), moved, attempt)
        return _finish(stage, settings, device, host, disk, minutes, False, notes)

    if stage == "similarity":
        stored = settings.stored_tokens
        cka = min(settings.cka_max_tokens, stored)
        host = 2 * SIMILARITY_CHUNK + (L + 1) * min(cka * cka, cka * H) * 8
        flops = 2 * (L + 1) ** 2 * stored * H + 2 * (L + 1) ** 2 * min(cka * cka * cka, cka * H * H)
        moved = (L + 1) * stored * H * s  # every layer file read once by the cosine pass
        minutes = _minutes(stage, replace(settings, device="cpu"), flops, moved, attempt)
        return Need(stage, 0, math.ceil(host * HOST_SLACK) + HOST_BASE, 0, 0, minutes)

    if stage == "search":
        # the running stream and a trial's stream (SLEB) or the cached original stream (LaCo, SLM) of the
        # search's tokens, one block resident at a time (more while they fit in the budget)
        ns = min(n, settings.search_samples or n)
        Ts = min(T, settings.search_sample_len or T)
        block = shapes.block_params * (c + (w if cpu else 0))
        device = max(V * H * c + LOGIT_CHUNK * V * 4, block + block_working_bytes(shapes, b * Ts, Ts, c, cpu=cpu))
        if settings.method == "flattengpt" and settings.plan_criterion == "trial_error":  # a pair per candidate
            group = group_memory(shapes, settings, 2)
            device = max(device, group["device"])
            host = 3 * hidden_state + group["host"]  # X_l, X_{l+1}, X_{l+2} beside the trial's own
            mI, mq = 2 * shapes.intermediate, 2 * shapes.q_width
            flops = (L * _forward_flops(shapes, n * T, T, num_layers=1)
                     + (L - 1) * 4 * _forward_flops(shapes, n * T, T, num_layers=1, m=2))
            fp64 = (L - 1) * (2 * n * T * (mI * mI + mq * mq) + 2 * mI ** 3)
            minutes = _minutes(stage, settings, flops, L * shapes.block_params * w, attempt, fp64_flops=fp64)
            return _finish(stage, settings, device, host, host, minutes, False, notes)
        if settings.method in ("laco", "slm"):
            # X_0..X_L of the samples cached; ~2 L trials of up to L forwards per search, repeats memoized
            host = (L + 3) * ns * Ts * H * c
            forwards = L + 2 * L * L
        else:  # sleb: k rounds of at most L (L - 1) / 2 + L forwards
            host = 3 * ns * Ts * H * c
            forwards = max(k, 1) * (L * (L - 1) // 2 + L)
        flops = forwards * _forward_flops(shapes, ns * Ts, Ts, num_layers=1) + forwards * 2 * ns * Ts * V * H / L
        minutes = _minutes(stage, settings, flops, L * shapes.block_params * w, attempt)
        if minutes > 7 * 24 * 60:
            notes.append(f"search ({settings.method}): about {minutes / 1440:.0f} days at {ns} x {Ts} tokens; "
                         "lower the method's samples")
        return _finish(stage, settings, device, host, host, minutes, False, notes)

    if stage == "recover":  # LoRA (or full) fine-tuning of the compressed model, whole on one device
        r = settings.recovery or {}
        micro, cutoff = r.get("micro_batch_size", 4), r.get("cutoff_len", 256)
        params = shapes.total_params - k * shapes.block_params
        layers = L - k
        full = bool(r.get("full_finetune"))
        per_layer = (r.get("rank", 8) * (7 * H + 2 * shapes.q_width + 2 * shapes.kv_width + 3 * shapes.intermediate))
        trainable = params if full else per_layer * layers
        tokens = micro * cutoff
        # weights; fp32 grads + Adam moments of the trainable ones; activations kept for backward (all layers on
        # the CPU, one layer's plus every layer's input with gradient checkpointing on a GPU); logits and grads
        saved = layers * tokens * (16 * H + 6 * shapes.intermediate) * c if cpu else layers * tokens * H * c \
            + block_working_bytes(shapes, tokens, cutoff, c)
        device = params * c + trainable * 12 + saved + 2 * tokens * V * 4
        steps = r.get("max_steps") or math.ceil(r.get("epochs", 2) * ASSUMED_RECOVERY_EXAMPLES
                                                / r.get("batch_size", 64))
        flops = (6 if full else 4) * params * steps * r.get("batch_size", 64) * cutoff
        minutes = _minutes(stage, settings, flops, 2 * params * w, attempt)
        disk = params * w + trainable * 12  # the merged checkpoint; the resume state (weights, moments)
        return _finish(stage, settings, device, params * w + 2**30, disk, minutes, False, notes)

    if stage == "compress":
        m = settings.group_size
        output = (shapes.total_params - k * shapes.block_params) * w
        if settings.method == "replaceme":  # the patched block and the k removed ones resident; two d x d float64 sums
            device = ((k + 1) * shapes.block_params * c + block_working_bytes(shapes, b * T, T, c, cpu=cpu)
                      + 6 * H * H * 8)
            flops = _forward_flops(shapes, n * T, T, num_layers=L + 1) + 4 * n * T * H * H + 2 * H ** 3
            minutes = _minutes(stage, settings, flops, output + shapes.total_params * w, attempt)
            return _finish(stage, settings, device, 2 * hidden_state, output + 2 * hidden_state, minutes, False,
                           notes)
        if settings.method != "flattengpt":  # drop / flatten-only: blocks copied or concatenated, no calibration
            device = 2 * m * shapes.block_params * c
            minutes = _minutes(stage, settings, 0, output + shapes.total_params * w, attempt)
            return _finish(stage, settings, device, 0, output, minutes, False, notes)
        group = group_memory(shapes, settings, m)
        host = group["host"]  # the hidden states' two copies included
        disk = output + 2 * hidden_state
        flat_groups = k // max(1, m - 1)
        # every group's forward on the calibration set (3 passes through a flattened one) + Gram sums + solves
        flops = _forward_flops(shapes, n * T, T, num_layers=L - m * flat_groups)
        flops += flat_groups * 3 * _forward_flops(shapes, n * T, T, num_layers=1, m=m)
        mI, mq = m * shapes.intermediate, m * shapes.q_width
        fp64 = flat_groups * (2 * n * T * (mI * mI + mq * mq) + 2 * mI ** 3)
        minutes = _minutes(stage, settings, flops, disk + shapes.total_params * w, attempt, fp64_flops=fp64)
        return _finish(stage, settings, group["device"], host, disk, minutes, False, notes)

    e = DTYPE_BYTES[settings.eval_dtype]
    if stage == "perplexity":
        Tp, N = settings.ppl_seq_len, settings.ppl_windows
        device = max(V * H * e + LOGIT_CHUNK * V * 4, shapes.block_params * (e + (w if cpu else 0))
                     + block_working_bytes(shapes, settings.ppl_batch_size * Tp, Tp, e, cpu=cpu))
        host = 2 * min(settings.ppl_windows_per_pass or N, N) * Tp * H * e
        flops = _forward_flops(shapes, N * Tp, Tp) + 2 * N * Tp * V * H
        minutes = _minutes(stage, replace(settings, dtype=settings.eval_dtype), flops,
                           shapes.total_params * w, attempt)
        return _finish(stage, settings, device, host, 0, minutes, False, notes)

    if stage == "zero_shot":
        z = DTYPE_BYTES[settings.zero_shot_dtype]
        t = settings.zero_shot_batch_size * ASSUMED_TASK_TOKENS
        weights = shapes.total_params * z
        device = weights + shapes.kv_cache_bytes(t, z) + block_working_bytes(shapes, t, ASSUMED_TASK_TOKENS, z) \
            + 2 * t * V * z
        flops = _forward_flops(shapes, ASSUMED_TASK_REQUESTS * ASSUMED_TASK_MEAN_TOKENS, ASSUMED_TASK_MEAN_TOKENS)
        minutes = _minutes(stage, replace(settings, dtype=settings.zero_shot_dtype), flops, weights, attempt)
        return _finish(stage, settings, device, weights, 0, minutes, True, notes)

    if stage == "speed":
        compressed = shapes.total_params - k * shapes.block_params
        t = settings.speed_batch_size * (settings.prompt_len + settings.decode_tokens)
        kv = shapes.kv_cache_bytes(t, e) + shapes.kv_cache_bytes(t, e, L - k)
        if settings.interleave:  # both models stay loaded through the timed rounds
            weights = (shapes.total_params + compressed) * e
        else:
            weights, kv = shapes.total_params * e, shapes.kv_cache_bytes(t, e)
        device = weights + kv + block_working_bytes(shapes, settings.speed_batch_size * settings.prompt_len,
                                                    settings.prompt_len, e)
        runs = 3 * (2 + 5)  # footprint pass + warmup + repeats, prefill and decode (schema defaults)
        flops = 2 * runs * _forward_flops(shapes, t, settings.prompt_len)
        minutes = _minutes(stage, replace(settings, dtype=settings.eval_dtype), flops,
                           (shapes.total_params + compressed) * w, attempt)
        return _finish(stage, settings, device, weights, 0, minutes, True, notes)

    # generate
    t = GENERATION_PROMPT_TOKENS + settings.max_new_tokens
    weights = shapes.total_params * e
    device = weights + shapes.kv_cache_bytes(t, e) + block_working_bytes(shapes, t, t, e)
    flops = 3 * settings.max_new_tokens * _forward_flops(shapes, t, t)
    minutes = _minutes(stage, replace(settings, dtype=settings.eval_dtype), flops, shapes.total_params * w, attempt)
    return _finish(stage, settings, device, weights, 0, minutes, True, notes)


def retry_factor(attempt: int) -> float:
    """Memory on a retry after an OOM or a timeout: x (1 + 0.5 (attempt - 1)); runtime is x attempt."""
    return 1 + 0.5 * (max(1, attempt) - 1)


def slurm_resources(need: Need, attempt: int = 1) -> dict:
    """The job's Snakemake resources: gpu, mem_mb, disk_mb (host memory and disk grow on retries), runtime."""
    factor = retry_factor(attempt)
    return {"gpu": need.gpus, "mem_mb": math.ceil(need.mem_mb * factor), "disk_mb": need.disk_mb,
            "runtime": need.minutes}


# ----------------------------------------------------------------------------- model sources


def model_config(path: str | Path) -> dict:
    """config.json of a model directory, or the directory named by a results/{model}/model.json."""
    path = Path(path)
    if path.name == "model.json":
        path = Path(json.loads(path.read_text())["path"])
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SizingError(f"{path}: not found; give a Hugging Face config.json or the model directory holding it")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the README table


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}" if value else "-"


TABLE_HEADER = ("| model | parameters | stage | GPUs | GPU memory (GiB) | host memory (GiB) | disk (GiB) "
                "| runtime (min) |\n|---|---:|---|---:|---:|---:|---:|---:|")


def table_rows(name: str, shapes: Shapes, settings: Settings) -> list[str]:
    rows = []
    for stage in STAGES:
        need = stage_need(stage, shapes, settings)
        rows.append(f"| {name} | {shapes.total_params:,} | {stage} | {need.gpus} | {_gib(need.device_bytes)} "
                    f"| {_gib(need.host_bytes)} | {_gib(need.disk_bytes)} | {need.minutes} |")
    return rows


def paper_table(settings: Settings | None = None) -> str:
    """The README table: LLaMA-2 7B/13B/70B at 128 x 2048 calibration, the schema's default options."""
    base = settings or default_settings(n_samples=128, seq_len=2048)
    lines = [TABLE_HEADER]
    notes: list[str] = []
    for name, config in LLAMA2_CONFIGS.items():
        shapes = Shapes.from_config(config, where=name)
        settings_k = replace(base, remove_blocks=shapes.remove_blocks_for(PAPER_RATIOS[name]))
        lines += table_rows(name, shapes, settings_k)
        notes += [f"{name}: {note}" for stage in STAGES for note in stage_need(stage, shapes, settings_k).notes]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def settings_line(settings: Settings) -> str:
    return (f"calibration {settings.n_samples} x {settings.seq_len}, compute.dtype {settings.dtype}, "
            f"batch_size {settings.batch_size}, activations.store_dtype {settings.store_dtype}, "
            f"max_tokens {settings.max_tokens}, evaluation dtype {settings.eval_dtype}, "
            f"compress group of {settings.group_size} blocks, {settings.gpu_memory_bytes / GIB:.0f} GiB per GPU")


README_START, README_END = "<!-- sizing:start -->", "<!-- sizing:end -->"


def readme_section() -> str:
    """Everything between the README's sizing markers (regenerated by `flattengpt resources-table --readme`)."""
    settings = default_settings(n_samples=128, seq_len=2048)
    return "\n".join([
        README_START,
        "## Sizing for 7B-70B",
        "",
        "Every heavy rule's `gpu`, `mem_mb`, `disk_mb`, `runtime` and `threads` come from one function",
        "(`stage_resources` in `workflow/rules/common.smk`), which calls `flattengpt.sizing` with the",
        "model's shapes (from `results/{model}/model.json`, else its config.json: local directory, embedded",
        "model, hub cache; else LLaMA-2-7B's, so a dry run before a download shows 7B figures) and the",
        "config. A retry after a timeout or an out-of-memory kill asks for `mem_mb x (1 + 0.5 (attempt - 1))`",
        "and `runtime x attempt`. `compute.device: auto` and `cuda*` ask the cluster for GPUs, `cpu` for none;",
        "`cluster.gpu_memory_gb` is the memory of one GPU. Size your own model with",
        "`flattengpt resources path/to/config.json --n-samples 128 --seq-len 2048 --dtype bfloat16`.",
        "",
        f"LLaMA-2 at the paper's targets (7 of 32, 10 of 40, 16 of 80 blocks), {settings_line(settings)}:",
        "",
        paper_table(settings),
        "",
        "The same with the settings a GPU cluster runs (`compute.dtype: bfloat16`, `evaluation.dtype:",
        "bfloat16`, `evaluation.device_map: auto`), as in the paper protocol config above; only the whole-",
        "model evaluation stages need more than one 80 GiB GPU, and only for 70B:",
        "",
        paper_table(replace(settings, dtype="bfloat16", eval_dtype="bfloat16", zero_shot_dtype="bfloat16",
                            device_map="auto")),
        "",
        "Formulas (bytes; L blocks, H hidden, I intermediate, q = heads x head_dim, kv = KV heads x head_dim,",
        "V vocabulary, P_b parameters per block, P all parameters, n x T calibration tokens, b batch size,",
        "c compute dtype bytes, s stored activation bytes, w checkpoint dtype bytes):",
        "",
        "```",
        _docstring_formulas(),
        "```",
        "",
        "The compress figure is the compression stage's own `methods.flattengpt.group_memory_bytes`. Runtime is an estimate, not a measurement:",
        "FLOPs at assumed sustained rates (GPU: float32 15, bfloat16/float16 100, float64 8 TFLOP/s) plus",
        "bytes at 300 MB/s of disk and 5 GB/s host-to-device, x 2, at least the stage's old fixed limit",
        "(activations 120, compress 240, perplexity 120, zero_shot 240, speed 60, generate 30 min).",
        README_END,
    ])


def _docstring_formulas() -> str:
    text = __doc__.split("Parameters (exact", 1)[1]
    return ("Parameters (exact" + text.split("Runtime (minutes)", 1)[0]).rstrip()


def update_readme(path: str | Path) -> bool:
    """Rewrite the README's sizing section in place (appended when the markers are missing); True if changed."""
    path = Path(path)
    text = path.read_text()
    section = readme_section()
    if README_START in text and README_END in text:
        before, rest = text.split(README_START, 1)
        after = rest.split(README_END, 1)[1]
        new = before + section + after
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    if new != text:
        path.write_text(new)
    return new != text


def readme_table(text: str) -> str:
    """The sizing section of a README's text."""
    if README_START not in text or README_END not in text:
        raise SizingError(f"no {README_START} ... {README_END} section in the README")
    return README_START + text.split(README_START, 1)[1].split(README_END, 1)[0] + README_END


# ----------------------------------------------------------------------------- local GPUs


def visible_gpus(environ: Mapping[str, str] | None = None, dev: str | Path = "/dev") -> int:
    """GPUs a local job could use, without importing torch (the Snakefile calls it at every start).

    CUDA_VISIBLE_DEVICES when set (empty or -1: none), else the NVIDIA device nodes /dev/nvidiaN.
    """
    import os
    import re

    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        count = 0
        for entry in environ["CUDA_VISIBLE_DEVICES"].split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):  # CUDA stops at the first invalid index
                break
            count += 1
        return count
    dev = Path(dev)
    return sum(1 for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)) if dev.is_dir() else 0
