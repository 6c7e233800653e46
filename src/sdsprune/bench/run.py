"""Running a benchmark: load every backend, check its outputs against dense, compile the
static decode steps, then time every workload on every backend in interleaved rounds."""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdsprune.bench.peers import check_precisions, close_peers, greedy_agreement, start_peers
from sdsprune.bench.report import summarise
from sdsprune.errors import SdspruneError
from sdsprune.export import check_model_folder, is_sparse_checkpoint, read_manifest
from sdsprune.export.checkpoint import PART_SEPARATOR, SPARSE_WEIGHTS
from sdsprune.inference import (
    apply_backend,
    available_kernels,
    backend_report,
    load,
    weight_bytes,
)
from sdsprune.inference.decode import (
    DECODE_MODES,
    Step,
    compile_failure,
    compiled_step,
    eager_step,
    fused_step,
    new_cache,
    prefill,
)
from sdsprune.inference.gemv import measure_stream_bandwidth
from sdsprune.inference.loader import fused_decode_problem
from sdsprune.models import decoder_blocks, model_linears
from sdsprune.runinfo import library_versions, peak_memory
from sdsprune.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """What is measured; the defaults take a few minutes for a 135M model on 2 CPU cores.

    ``decode_modes``: eager, fused and/or static decoding (:data:`DECODE_MODES`); every
    backend is timed in each. ``auto`` (the default) is what ``sdsprune.load`` gives a user:
    fused where the fused step can serve the model, else eager. Where fused is timed,
    ``auto`` packs its layers as ``load`` does for the fused step. ``compile_backend``: torch.compile's backend for static decode (inductor
    generates fused kernels; tests use a faster one). ``ceiling``: also time eager decoding
    with the decoder blocks' linears skipped, to give each backend's bytes ceiling
    (:func:`bytes_ceilings`). ``llamacpp``: GGUF precisions (f32, bf16, q8_0) of the
    checkpoint to time in llama.cpp beside the backends (:mod:`sdsprune.bench.peers`).
    """

    repeats: int = 5
    warmup: int = 1
    prompt_tokens: int = 128
    decode_tokens: int = 16
    batch_sizes: tuple[int, ...] = (1, 8)
    seed: int = 0
    decode_modes: tuple[str, ...] = ("auto",)
    compile_backend: str = "inductor"
    ceiling: bool = True
    llamacpp: tuple[str, ...] = ()


@dataclass
class _Contender:
    name: str
    model: nn.Module
    steps: dict[str, Step] = field(default_factory=dict)  # decode mode -> decode step
    # (workload, decode mode, batch) -> seconds: per call (prefill) or per token (decode)
    samples: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    peak_cuda_mib: float | None = None

    def runs(self, kind: str, mode: str, batch: int) -> bool:
        return kind == "prefill" or mode in self.steps  # a static step may be skipped

    def seconds(self, kind: str, mode: str, ids: torch.Tensor, settings, dev) -> float:
        return _run_workload(self, kind, mode, ids, settings, dev)


def default_backends(device: torch.device) -> list[str]:
    """dense, every sparse kernel usable on ``device``, and auto."""
    return ["dense", *available_kernels(device), "auto"]


def run_bench(
    model_dir: str | Path,
    *,
    backends: Sequence[str] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    settings: BenchSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Prefill throughput and per-token decode latency of ``model_dir`` under each backend.

    ``dtype`` auto means float32 on CPU (torch's CPU sparse kernels need it) and bfloat16 on
    GPU. A sparse backend that leaves every layer dense is reported as skipped rather than
    timed, unless it is ``auto`` (whose "all dense" is itself the answer).
    """
    settings = settings or BenchSettings()
    _check_settings(settings)
    folder = check_model_folder(model_dir)
    _check_context(folder, settings)
    _check_sparse_folder(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    requested = list(backends) if backends else default_backends(dev)
    # dense is always measured, first: it is the baseline of every speedup.
    names = ["dense", *dict.fromkeys(n for n in requested if n != "dense")]
    say = progress or (lambda _msg: None)
    contenders, loads, skipped, modes = _load_all(
        folder, names, dev, torch_dtype, say, settings.decode_modes
    )
    settings = replace(settings, decode_modes=modes)
    mode_info = _prepare_steps(contenders, settings, dev, say)
    checks = _check_outputs(contenders, settings, dev)
    # the Amdahl ceiling needs eager decoding with the linears skipped (the fused step
    # refuses such a model; its ceiling is the step's bytes ratio, see _streaming)
    with_ceiling = settings.ceiling and "eager" in settings.decode_modes
    skipped_linears = _skipped_linears(folder, dev, torch_dtype) if with_ceiling else None
    with tempfile.TemporaryDirectory(prefix="sdsprune-gguf-") as workdir:
        peers, peer_loads, peer_skipped = start_peers(
            folder, settings.llamacpp, Path(workdir), _cache_tokens(settings), say
        )
        try:
            peer_checks = _check_peers(peers, contenders[0], settings, dev)
            timed = contenders + ([skipped_linears] if skipped_linears else []) + peers
            _measure(timed, settings, dev, say)
        finally:
            close_peers(peers)
    report = {
        "model": str(folder),
        "checkpoint": _checkpoint_info(folder, contenders[0].model),
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "settings": settings.__dict__
        | {"batch_sizes": list(settings.batch_sizes), "decode_modes": list(settings.decode_modes)},
        "backends": {c.name: loads[c.name] | checks[c.name] for c in contenders},
        "peers": {p.name: peer_loads[p.name] | peer_checks[p.name] for p in peers},
        "skipped": skipped | peer_skipped,
        "results": summarise([*contenders, *peers], settings.prompt_tokens),
        "streaming": _streaming(contenders, peer_loads, dev, torch_dtype),
        "ceiling": bytes_ceilings(contenders, skipped_linears, loads) if skipped_linears else None,
        "memory": peak_memory(),
        "versions": library_versions(),
    }
    report |= mode_info
    return report


def _check_peers(peers: list, dense: _Contender, settings: BenchSettings, dev) -> dict:
    """Each peer's greedy tokens against dense torch's, on the prompt the backends are
    checked on."""
    if not peers:
        return {}
    ids = _inputs(settings, 1, min(settings.prompt_tokens, 32), dev, _vocab(dense.model))
    with torch.inference_mode():
        dense_tokens, _ = _greedy_decode(dense.model, ids, settings)
    return {peer.name: greedy_agreement(peer, ids, dense_tokens) for peer in peers}


def _streaming(contenders: list[_Contender], peer_loads: dict, dev, dtype) -> dict | None:
    """What a batch-1 decode step must read, per backend, and the fastest it could read it.

    ``decode_weights_mib``: the block linears and the LM head in the form each backend holds
    them (a tied head counted once; llama.cpp: its GGUF's size). ``bandwidth_gib_s``: how fast
    this package's streaming kernel reads one large weight here, in this run; the ratio is
    each backend's floor in ms per token (what no engine reading those bytes beats).
    ``bytes_ratio``: dense's bytes over each backend's, the decode speedup a step that only
    read its weights would get (the ceiling of the fused step, which is little else)."""
    bandwidth = measure_stream_bandwidth(dtype) if dev.type == "cpu" else None
    if bandwidth is None:
        return None
    mib = {c.name: round(_decode_weight_bytes(c.model) / 2**20, 1) for c in contenders}
    mib |= {name: info["gguf_mib"] for name, info in peer_loads.items()}
    dense_mib = mib[contenders[0].name]
    return {
        "bandwidth_gib_s": round(bandwidth, 2),
        "decode_weights_mib": mib,
        "floor_ms_per_token": {k: round(v / 1024 / bandwidth * 1e3, 2) for k, v in mib.items()},
        "bytes_ratio": {c.name: round(dense_mib / mib[c.name], 3) for c in contenders[1:]},
    }


def _decode_weight_bytes(model: nn.Module) -> int:
    report = backend_report(model)
    linears = report.linear_bytes() if report else 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return linears + (weight_bytes(head) if head is not None else 0)


class _SkippedLinear(nn.Module):
    """A decoder-block linear at no weight cost (zeros out): what a decode step costs besides
    streaming those weights."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


SKIPPED_LINEARS = "linears skipped"


def _skipped_linears(folder: Path, dev, dtype) -> _Contender:
    """The dense model with every decoder-block linear skipped (its outputs zeros)."""
    model = load(folder, backend="dense", device=dev, dtype=dtype, decode="eager").model
    blocks = decoder_blocks(model)
    for name, layer in model_linears(model).items():
        index, path = name.split(".", 1)
        parent, _, attr = path.rpartition(".")
        setattr(blocks[int(index)].get_submodule(parent), attr, _SkippedLinear(layer.out_features))
    contender = _Contender(SKIPPED_LINEARS, model)
    contender.steps["eager"] = eager_step(model)
    return contender


def bytes_ceilings(contenders: list[_Contender], skipped: _Contender, loads: dict) -> dict:
    """Per backend and batch, the decode speedup over dense that its linears' bytes allow.

    Measured in this run: ``rest`` is eager decoding with the blocks' linears skipped, so
    dense's linears take ``p = 1 - rest / dense`` of a step. A backend whose linears hold
    ``s`` times fewer bytes than dense's makes them at most ``s`` times faster if dense
    streamed its weights at the machine's bandwidth (Amdahl: ``1 / ((1 - p) + p / s)``). A
    kernel that beats it streams its bytes faster than torch's dense GEMV does.
    """
    dense = contenders[0]
    dense_bytes = loads[dense.name]["linear_weights_mib"]
    result: dict = {"linear_share": {}, "speedup": {}}
    for (kind, mode, batch), samples in skipped.samples.items():
        if kind != "decode" or ("decode", mode, batch) not in dense.samples:
            continue
        share = 1 - statistics.median(samples) / statistics.median(dense.samples[kind, mode, batch])
        result["linear_share"][batch] = round(share, 3)
        for contender in contenders[1:]:
            ratio = dense_bytes / max(loads[contender.name]["linear_weights_mib"], 1e-9)
            speedup = 1 / ((1 - share) + share / ratio)
            result["speedup"].setdefault(contender.name, {})[batch] = round(speedup, 3)
    return result


def _check_settings(settings: BenchSettings) -> None:
    if settings.repeats < 1 or settings.prompt_tokens < 1 or settings.decode_tokens < 1:
        raise SdspruneError("repeats, prompt tokens and decode tokens must be at least 1")
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise SdspruneError("batch sizes must be positive integers, e.g. 1,8")
    check_precisions(tuple(settings.llamacpp))
    unknown = [mode for mode in settings.decode_modes if mode not in ("auto", *DECODE_MODES)]
    if not settings.decode_modes or unknown:
        raise SdspruneError(
            f"decode modes must be among auto, {', '.join(DECODE_MODES)} "
            f"(got {', '.join(settings.decode_modes) or 'none'})"
        )


def _check_context(folder: Path, settings: BenchSettings) -> None:
    """Refuse, before any loading, a prompt plus decode longer than the model's context:
    past it the model runs on positions it never learnt, and the timings mean nothing."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder)).get_text_config()
    except Exception:  # the loader reports an unreadable config in its own words
        return
    limit = getattr(config, "max_position_embeddings", None)
    tokens = _cache_tokens(settings)
    if isinstance(limit, int) and tokens > limit:
        raise SdspruneError(
            f"prompt tokens + decode tokens ({settings.prompt_tokens} + "
            f"{settings.decode_tokens} = {tokens}) exceed the model's maximum context of "
            f"{limit} tokens"
        )


def _check_sparse_folder(folder: Path) -> None:
    """Refuse, before the first progress line, a sparse folder whose manifest names a file
    outside it or whose tensors do not fit its config (loading refuses them too, but only
    after saying "loading ..."). Reads the manifest and the weights file's header only."""
    if not is_sparse_checkpoint(folder):
        return
    manifest = read_manifest(folder)
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {name: tuple(info["shape"]) for name, info in manifest["tensors"].items()}
    try:
        with safe_open(str(folder / manifest.get("weights_file", SPARSE_WEIGHTS)), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if PART_SEPARATOR not in key:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    except Exception:  # a missing or damaged file: the loader says so in its own words
        return
    state = model.state_dict()
    reshaped = [
        name for name, shape in shapes.items() if name in state and state[name].shape != shape
    ]
    if reshaped:
        raise SdspruneError(
            f"{folder} does not match its config ({len(reshaped)} of another shape: "
            f"{', '.join(reshaped[:3])})"
        )


def _load_all(
    folder: Path, names: list[str], dev, dtype, say, modes: tuple[str, ...]
) -> tuple[list, dict, dict, tuple[str, ...]]:
    """Every backend's model (dense first), and the decode modes with ``auto`` resolved on
    the dense model. Each backend is applied as ``load`` applies it for those modes: where
    the fused step is timed, ``auto`` packs every pruned layer for it."""
    contenders, loads, skipped = [], {}, {}
    for name in names:
        say(f"loading {folder.name} with backend {name}")
        before = _cuda_allocated(dev)
        start = time.perf_counter()
        loaded = load(folder, backend="dense", device=dev, dtype=dtype, decode="eager")
        if name == "dense":
            modes = resolve_decode_modes(modes, loaded.model)
        apply_backend(loaded.model, name, fused_decode="fused" in modes)
        seconds = time.perf_counter() - start
        report = backend_report(loaded.model)
        kernels = report.counts() if report else {"dense": 0}
        if name not in ("dense", "auto") and set(kernels) == {"dense"}:
            reason = report.layers[0].reason if report and report.layers else "no layers"
            skipped[name] = f"no layer can use it ({reason})"
            del loaded
            gc.collect()
            continue
        loads[name] = {
            "kernels": kernels,
            "load_seconds": round(seconds, 2),
            "weights_mib": round(weight_bytes(loaded.model) / 2**20, 1),
            "linear_weights_mib": round(report.linear_bytes() / 2**20, 1) if report else None,
        }
        if report and any(layer.timings_us for layer in report.layers):
            loads[name]["layer_speedups"] = _layer_speedups(report)
        if dev.type == "cuda":
            loads[name]["cuda_weights_mib"] = round((_cuda_allocated(dev) - before) / 2**20, 1)
        contenders.append(_Contender(name, loaded.model))
    return contenders, loads, skipped, modes


def resolve_decode_modes(modes: Sequence[str], model: nn.Module) -> tuple[str, ...]:
    """``modes`` with ``auto`` replaced by what ``load(decode="auto")`` gives ``model``:
    fused where the fused step can serve it, else eager (duplicates dropped)."""
    chosen = "eager" if fused_decode_problem(model) else "fused"
    return tuple(dict.fromkeys(chosen if mode == "auto" else mode for mode in modes))


def _layer_speedups(report) -> dict[str, dict[int, float]]:
    """Median over layers of dense time / kernel time at each probe size (auto's timings).

    This is why ``auto`` chose what it chose: below 1.0 the kernel is slower than dense.
    """
    ratios: dict[str, dict[int, list[float]]] = {}
    for layer in report.layers:
        dense = layer.timings_us.get("dense", {})
        for kernel, times in layer.timings_us.items():
            if kernel == "dense":
                continue
            for tokens, micros in times.items():
                if micros > 0 and tokens in dense:
                    ratios.setdefault(kernel, {}).setdefault(tokens, []).append(
                        dense[tokens] / micros
                    )
    return {
        kernel: {
            tokens: round(statistics.median(values), 3) for tokens, values in by_tokens.items()
        }
        for kernel, by_tokens in ratios.items()
    }


def _cuda_allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def _checkpoint_info(folder: Path, model: nn.Module) -> dict:
    """Format, and the measured sparsity of the prunable layers (whatever made the zeros)."""
    total = zeros = 0
    for layer in model_linears(model).values():
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.layout == torch.strided:
            total += weight.numel()
            zeros += weight.numel() - int(weight.count_nonzero())
    info = {"format": "sparse" if is_sparse_checkpoint(folder) else "dense"}
    if total:
        info["prunable_sparsity"] = round(zeros / total, 4)
    if info["format"] == "sparse":
        info["patterns"] = read_manifest(folder)["sizes"].get("patterns", {})
    return info


def _inputs(settings: BenchSettings, batch: int, tokens: int, dev, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + batch)
    return torch.randint(0, vocab, (batch, tokens), generator=generator).to(dev)


def _vocab(model: nn.Module) -> int:
    return int(getattr(model.config, "vocab_size", 256))


def _cache_tokens(settings: BenchSettings) -> int:
    """Positions of every static cache: one size, so that one compiled graph serves all."""
    return settings.prompt_tokens + settings.decode_tokens


def _prepare_steps(contenders: list[_Contender], settings: BenchSettings, dev, say) -> dict:
    """Give every contender its decode step per mode; compile the static ones now, untimed.
    Returns the report's part on the static and fused modes (``static_decode``,
    ``fused_decode``), where they were asked for.

    When dense cannot be compiled, the compiler itself fails (no C++ compiler, an inductor
    error): every backend then decodes with the static cache uncompiled, and the report says
    why. When only another backend fails (an op dynamo cannot trace), that backend's static
    decode is skipped with the reason: timed uncompiled against compiled dense, it would mix
    the overhead cut into its sparse speedup.
    """
    info = {}
    if "eager" in settings.decode_modes:
        for contender in contenders:
            contender.steps["eager"] = eager_step(contender.model)
    if "fused" in settings.decode_modes:
        info["fused_decode"] = {"skipped": _add_fused_steps(contenders, settings, dev)}
    if "static" in settings.decode_modes:
        info["static_decode"] = _add_static_steps(contenders, settings, dev, say)
    return info


def _add_fused_steps(contenders: list[_Contender], settings: BenchSettings, dev) -> dict:
    """Each contender's fused step (warmed up at every batch size); returns why a contender
    has none. Without dense's, none is timed: its rows would have no baseline."""
    skipped = {}
    for contender in contenders:
        try:
            step = fused_step(contender.model)
            _warm_up(contender.model, step, "fused", settings, dev)
        except ValueError as exc:
            skipped[contender.name] = str(exc)
            continue
        contender.steps["fused"] = step
    if contenders[0].name in skipped:
        for contender in contenders[1:]:
            contender.steps.pop("fused", None)
            skipped.setdefault(contender.name, "dense has no fused step")
    return skipped


def _add_static_steps(contenders: list[_Contender], settings: BenchSettings, dev, say) -> dict:
    """Every contender's static step, compiled (see :func:`_prepare_steps`); returns the
    report's ``static_decode`` part."""
    info = {
        "compile_backend": settings.compile_backend,
        "compiled": True,
        "fallback": None,
        "compile_seconds": {},
        "skipped": {},
    }
    failure = _static_baseline(contenders[0], settings, dev, say, info)
    if failure is not None:  # the static cache itself fails: nothing to compare against
        skipped = {c.name: f"dense failed: {failure}" for c in contenders}
        info.update(compiled=False, fallback=None, skipped=skipped)
        return info
    for contender in contenders[1:]:
        failure = _add_static_step(contender, settings, dev, say, info)
        if failure is not None:
            info["skipped"][contender.name] = failure
    return info


def _static_baseline(
    dense: _Contender, settings: BenchSettings, dev, say, info: dict
) -> str | None:
    """Dense's static step, compiled, or uncompiled when the compiler fails (every other
    backend then follows); returns why dense has no static step at all (None: it has one)."""
    failure = _add_static_step(dense, settings, dev, say, info)
    if failure is None:
        return None
    info["compiled"], info["fallback"] = False, failure
    say(f"torch.compile failed ({failure}): static KV cache without compile")
    return _add_static_step(dense, settings, dev, say, info)


def _add_static_step(
    contender: _Contender, settings: BenchSettings, dev, say, info: dict
) -> str | None:
    """Give ``contender`` its static step (compiled as ``info`` says, the compile timed), or
    return why it failed."""
    if info["compiled"]:
        say(
            f"compiling the static decode step of {contender.name} with torch.compile "
            f"({settings.compile_backend}; once per backend, can take minutes)"
        )
    start = time.perf_counter()
    step = _static_step(contender.model, contender.name, settings, dev, info["compiled"])
    if isinstance(step, str):
        return step
    contender.steps["static"] = step
    if info["compiled"]:
        info["compile_seconds"][contender.name] = round(time.perf_counter() - start, 1)
    return None


def _static_step(
    model: nn.Module, name: str, settings: BenchSettings, dev, compile_step: bool
) -> Step | str:
    """The static decode step, compiled or not, run at every batch size (which compiles
    it); or why it failed."""
    try:
        step = (
            compiled_step(model, name, settings.compile_backend)
            if compile_step
            else eager_step(model)
        )
        _warm_up(model, step, "static", settings, dev)
    except Exception as exc:  # dynamo and inductor fail in many exception types
        return compile_failure(exc)
    return step


def _warm_up(model: nn.Module, step: Step, mode: str, settings: BenchSettings, dev) -> None:
    """Two decode steps in ``mode`` at each batch size: compiles what the timed runs will call.

    Dynamo's hints on a failure are silenced: the failure is reported with its reason.
    """
    vocab = _vocab(model)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in settings.batch_sizes:
            ids = _inputs(settings, batch, settings.prompt_tokens, dev, vocab)
            _decode(model, step, mode, ids, 2, _cache_tokens(settings), dev)


def _check_outputs(contenders: list[_Contender], settings: BenchSettings, dev) -> dict:
    """Largest logit difference of each backend from dense on one prompt (0 for dense), and
    where static decoding runs, of its static from its eager decoding."""
    vocab, tokens = _vocab(contenders[0].model), min(settings.prompt_tokens, 32)
    ids = _inputs(settings, 1, tokens, dev, vocab)
    # at a batch size the warm-up compiled: a new one would compile here, unannounced
    static_ids = _inputs(settings, settings.batch_sizes[0], tokens, dev, vocab)
    checks = {}
    with torch.inference_mode():
        reference = contenders[0].model(ids).logits.float()
        dense_tokens, dense_logits = _greedy_decode(contenders[0].model, ids, settings)
        for contender in contenders:
            diff = (contender.model(ids).logits.float() - reference).abs().max().item()
            chosen, logits = _greedy_decode(contender.model, ids, settings, dense_tokens)
            checks[contender.name] = {
                "max_abs_logit_diff_vs_dense": round(diff, 6),
                "max_abs_decode_logit_diff_vs_dense": round(
                    (logits - dense_logits).abs().max().item(), 6
                ),
                # each choice made after dense's own tokens: all equal exactly when the
                # backend's free greedy decoding equals dense's (by induction on the steps)
                "same_greedy_tokens_as_dense": torch.equal(chosen, dense_tokens),
            }
            for mode in ("static", "fused"):
                if mode in contender.steps:
                    checks[contender.name][f"{mode}_vs_eager"] = _mode_vs_eager(
                        contender, mode, static_ids, settings
                    )
    return checks


def _greedy_decode(
    model: nn.Module,
    ids: torch.Tensor,
    settings: BenchSettings,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of ``decode_tokens`` tokens after ``ids`` (eager, as generate
    decodes): the model's greedy choice at each position and the logits of each decode step.

    With ``forced`` tokens fed instead of its own choices, the step logits compare with
    another backend's position by position: the decode-sized calls, where a sparse kernel
    runs (a prompt goes through the expanded weights)."""
    step, cache = eager_step(model), new_cache(model, "eager", _cache_tokens(settings))
    choice, chosen, logits = prefill(model, ids, cache), [], []
    for i in range(settings.decode_tokens):
        chosen.append(choice)
        fed = choice if forced is None else forced[:, i : i + 1]
        step_logits, choice = step(fed, cache)
        logits.append(step_logits.float())
    return torch.cat(chosen, dim=-1), torch.stack(logits)


def _mode_vs_eager(contender: _Contender, mode: str, ids: torch.Tensor, settings) -> dict:
    """Greedy decoding in eager mode, with ``mode``'s step fed the same tokens: its largest
    logit difference over the steps, and whether every greedy choice is the same."""
    model, eager, static = contender.model, eager_step(contender.model), contender.steps[mode]
    eager_cache = new_cache(model, "eager", _cache_tokens(settings))
    static_cache = new_cache(model, mode, _cache_tokens(settings))
    token = prefill(model, ids, eager_cache)
    prefill(model, ids, static_cache)
    diff, same = 0.0, True
    for _ in range(settings.decode_tokens):
        logits, next_token = eager(token, eager_cache)
        static_logits, static_token = static(token, static_cache)
        diff = max(diff, (static_logits.float() - logits.float()).abs().max().item())
        same = same and torch.equal(static_token, next_token)
        token = next_token
    return {"max_abs_logit_diff": round(diff, 6), "same_greedy_tokens": same}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _prefill_seconds(model: nn.Module, ids: torch.Tensor, dev) -> float:
    """One prompt into a fresh dynamic cache, as ``generate`` runs it (last logits only)."""
    cache = new_cache(model, "eager", ids.shape[1])
    _sync(dev)
    start = time.perf_counter()
    prefill(model, ids, cache)
    _sync(dev)
    return time.perf_counter() - start


def _decode(
    model: nn.Module, step: Step, mode: str, ids: torch.Tensor, steps: int, cache_tokens: int, dev
) -> float:
    """Greedy decoding with ``mode``'s KV cache after an untimed prefill; mean seconds per step."""
    cache = new_cache(model, mode, cache_tokens)
    token = prefill(model, ids, cache)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        _, token = step(token, cache)
    _sync(dev)
    return (time.perf_counter() - start) / steps


def _measure(contenders: list[_Contender], settings: BenchSettings, dev, say) -> None:
    """Rounds of: for each workload, every backend in turn (order rotating per round).

    Interleaving at the workload level keeps a burst of load from elsewhere on a shared
    machine from landing on one backend's measurements only.
    """
    vocab = _vocab(contenders[0].model)
    inputs = {
        b: _inputs(settings, b, settings.prompt_tokens, dev, vocab) for b in settings.batch_sizes
    }
    decodes = [("decode", mode) for mode in dict.fromkeys(settings.decode_modes)]
    workloads = [
        (kind, mode, batch)
        for batch in settings.batch_sizes
        for kind, mode in [("prefill", "eager"), *decodes]
    ]
    rounds = settings.warmup + settings.repeats
    for round_index in range(rounds):
        label = "warm-up" if round_index < settings.warmup else "repeat"
        say(f"{label} {round_index + 1}/{rounds}")
        shift = round_index % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        for kind, mode, batch in workloads:
            for contender in order:
                if not contender.runs(kind, mode, batch):
                    continue
                seconds = contender.seconds(kind, mode, inputs[batch], settings, dev)
                if round_index >= settings.warmup:
                    contender.samples.setdefault((kind, mode, batch), []).append(seconds)
    if dev.type == "cuda":
        _record_cuda_peaks([c for c in contenders if c.steps], inputs, settings, dev)


def _run_workload(
    contender: _Contender, kind: str, mode: str, ids: torch.Tensor, settings, dev
) -> float:
    with torch.inference_mode():
        if kind == "prefill":
            return _prefill_seconds(contender.model, ids, dev)
        return _decode(
            contender.model,
            contender.steps[mode],
            mode,
            ids,
            settings.decode_tokens,
            _cache_tokens(settings),
            dev,
        )


def _record_cuda_peaks(order: list[_Contender], inputs: dict, settings, dev) -> None:
    """Peak CUDA memory of each backend over one untimed pass of the largest workload (in
    every decode mode)."""
    batch = max(inputs)
    for contender in order:
        torch.cuda.reset_peak_memory_stats(dev)
        for mode in contender.steps:
            _run_workload(contender, "decode", mode, inputs[batch], settings, dev)
        contender.peak_cuda_mib = torch.cuda.max_memory_allocated(dev) / 2**20
