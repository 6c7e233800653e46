"""Swap the pruned linear layers of a loaded model for sparse kernels, per layer.

Backends:

- ``dense``: leave the model alone (the default, and the baseline of every comparison);
- ``csr`` / ``bsr``: torch sparse CSR / BSR matmul on every pruned layer that can use it;
- ``nm24``: this package's AVX-512 / AVX2 CPU kernel for 2:4 layers (float32 or bfloat16,
  built on first use);
- ``semi-structured``: torch's 2:4 kernels on CUDA GPUs of compute capability >= 8.0;
- ``auto``: per layer, time dense against each kernel available on the model's device at
  decode-sized and prefill-sized token counts, smallest first, and keep the kernel that beats
  dense by a margin up to the largest count. A kernel that wins only up to some count (decode,
  typically) is used for calls of up to that many tokens and dense above, switched at run
  time by each call's token count (:class:`SwitchedLinear`). Where sparse is slower at every
  count, the layer stays dense: sparse is never chosen on faith.

Every swapped layer is checked against the dense layer on a random input before it is kept;
a kernel that fails there or while it is timed (torch refuses some shapes only when the
product runs) leaves the layer dense with the reason, never crashes the load.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdsprune.errors import SdspruneError
from sdsprune.inference.kernels import (
    KERNELS,
    PROBLEMS,
    SwitchedLinear,
    semi_structured_device_problem,
)
from sdsprune.models import model_linears

log = logging.getLogger(__name__)

BACKENDS = ("dense", "auto", "csr", "bsr", "nm24", "semi-structured")
MIN_SPARSITY = 0.3
AUTO_MARGIN = 1.05  # a sparse kernel must be >= 5% faster than dense to be chosen
# decode at batch 1, 4 and 8, a small prefill, a prompt; ascending: losers drop out early
PROBE_TOKENS = (1, 4, 8, 16, 512)
REPORT_ATTR = "sdsprune_backend"
# A decode step streams every weight from memory (the model is far larger than the caches),
# so on CPU, calls of up to COLD_MAX_TOKENS tokens are timed one at a time right after
# writing a buffer larger than common last-level caches. Timed hot, one layer's weights sit
# in cache and dense looks faster than in a model: on the default model with the AVX2 nm24
# kernel, hot timings kept 131 of 210 layers dense (nm24 0.81x at 1 token, median) although
# nm24 on every layer decoded 1.21x faster than dense in the same run.
COLD_MAX_TOKENS = 16
CACHE_FLUSH_BYTES = 64 * 2**20

# Given {kernel: fn} (all run on a ``tokens``-row input), return {kernel: seconds per call}. Interleaving the calls matters on a
# shared machine: a burst of load from elsewhere then slows every contender, not just one.
Timer = Callable[[dict[str, Callable[[], object]], int], dict[str, float]]


@dataclass
class LayerChoice:
    """What one prunable layer runs with, and why."""

    name: str
    kernel: str
    sparsity: float
    reason: str = ""
    timings_us: dict[str, dict[int, float]] = field(default_factory=dict)
    max_tokens: int | None = None  # the kernel serves calls up to this many tokens; None: all

    def label(self) -> str:
        """The kernel, with its token limit when dense takes the larger calls."""
        return self.kernel if self.max_tokens is None else f"{self.kernel}<={self.max_tokens}"


@dataclass
class BackendReport:
    """The outcome of :func:`apply_backend`, also stored on the model as ``sdsprune_backend``."""

    backend: str
    device: str
    layers: list[LayerChoice]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.label()] = counts.get(layer.label(), 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "device": self.device,
            "kernels": self.counts(),
            "layers": [asdict(layer) for layer in self.layers],
        }


def available_kernels(device: torch.device) -> list[str]:
    """Sparse kernels worth trying on ``device`` (what ``auto`` measures)."""
    if device.type == "cuda":
        return ["semi-structured"] if semi_structured_device_problem(device) is None else []
    return ["csr", "bsr", "nm24"]


def apply_backend(
    model: nn.Module,
    backend: str = "dense",
    *,
    min_sparsity: float = MIN_SPARSITY,
    probe_tokens: Sequence[int] = PROBE_TOKENS,
    margin: float = AUTO_MARGIN,
    timer: Timer | None = None,
    verify: bool = True,
    converters: dict[str, Callable[[nn.Linear], nn.Module]] | None = None,
) -> BackendReport:
    """Replace pruned decoder-block linears of ``model`` in place; return what was chosen.

    ``timer({kernel: fn}, tokens) -> {kernel: seconds}`` and ``converters`` (kernel -> module factory) are
    injectable so that the choice logic can be tested deterministically on a CPU.
    """
    if backend not in BACKENDS:
        raise SdspruneError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    device = _model_device(model)
    if backend == "semi-structured" and converters is None:
        problem = semi_structured_device_problem(device)
        if problem:
            raise SdspruneError(f"backend 'semi-structured' unavailable: {problem}")
    factories = {**KERNELS, **(converters or {})}
    timer = timer or _default_timer(device)
    choices = []
    probe = _Probe(sorted(probe_tokens), margin, timer, verify)
    for name, linear, parent, attr in _prunable_layers(model):
        choice, module = _choose(name, linear, backend, device, factories, min_sparsity, probe)
        if module is not None:
            setattr(parent, attr, module)
        choices.append(choice)
    report = BackendReport(backend=backend, device=str(device), layers=choices)
    setattr(model, REPORT_ATTR, report)
    log.info("backend %s on %s: %s", backend, device, report.counts())
    return report


def backend_report(model: nn.Module) -> BackendReport | None:
    """The report of the last :func:`apply_backend` on ``model`` (None if never applied)."""
    return getattr(model, REPORT_ATTR, None)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _prunable_layers(model: nn.Module):
    """(name, linear, parent module, attribute) for every decoder-block linear."""
    parents = {
        id(child): (module, attr)
        for module in model.modules()
        for attr, child in module.named_children()
    }
    for name, linear in model_linears(model).items():
        parent, attr = parents[id(linear)]
        yield name, linear, parent, attr


def _sparsity(linear: nn.Linear) -> float:
    weight = linear.weight.detach()
    return 1.0 - weight.count_nonzero().item() / max(weight.numel(), 1)


def _choose(
    name: str,
    linear: nn.Linear,
    backend: str,
    device: torch.device,
    factories: dict,
    min_sparsity: float,
    probe: _Probe,
) -> tuple[LayerChoice, nn.Module | None]:
    sparsity = _sparsity(linear)
    choice = LayerChoice(name=name, kernel="dense", sparsity=round(sparsity, 4))
    if backend == "dense":
        return choice, None
    if sparsity < min_sparsity:
        choice.reason = f"sparsity {sparsity:.0%} below {min_sparsity:.0%}"
        return choice, None
    kernels = available_kernels(device) if backend == "auto" else [backend]
    candidates, reasons = {}, []
    for kernel in kernels:
        problem = PROBLEMS[kernel](linear)
        if problem:
            reasons.append(f"{kernel}: {problem}")
            continue
        try:
            module = factories[kernel](linear)
            probe.verify_kernel(kernel, linear, module)
            if backend != "auto":  # auto's race calls every size itself, guarded
                probe.runs_at(kernel, linear, module, probe.tokens)
            candidates[kernel] = module
        except _Refused as exc:
            reasons.append(str(exc))
        except (RuntimeError, ValueError) as exc:  # torch rejects some shapes/dtypes late
            reasons.append(f"{kernel}: {_first_line(exc)}")
    if backend != "auto" and candidates:
        kernel, module = next(iter(candidates.items()))
        choice.kernel, choice.reason = kernel, "forced by backend"
        return choice, module
    if candidates:
        return probe.race(choice, linear, candidates, reasons)
    choice.reason = "; ".join(reasons) or "no sparse kernel on this device"
    return choice, None


class _Refused(Exception):
    """A kernel that failed verification or refused to run: the layer stays dense."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


@dataclass
class _Probe:
    """Verification and timing of candidate kernels, with every kernel call guarded."""

    tokens: list[int]
    margin: float
    timer: Timer
    verify: bool

    def verify_kernel(self, kernel: str, linear: nn.Linear, module: nn.Module) -> None:
        """Raise :class:`_Refused` unless ``module`` reproduces the dense layer (when asked)."""
        if self.verify and not _guarded(kernel, lambda: _matches_dense(linear, module)):
            raise _Refused(f"{kernel} output did not match dense")

    def runs_at(self, kernel: str, linear: nn.Linear, module: nn.Module, sizes) -> None:
        """Raise :class:`_Refused` if ``module`` refuses any of these token counts."""
        with torch.inference_mode():
            for tokens in sizes:
                _guarded(
                    f"{kernel} at {tokens} tokens",
                    lambda t=tokens: module(_random_input(linear, t)),
                )

    def race(
        self,
        choice: LayerChoice,
        linear: nn.Linear,
        candidates: dict[str, nn.Module],
        reasons: list[str],
    ) -> tuple[LayerChoice, nn.Module | None]:
        """Time dense and the candidates at each probe size, smallest first; a candidate not
        faster by the margin drops out (larger sizes are not timed for it), and is used only up
        to the last size it won, dense above. Keep the kernel whose arrangement has the lowest
        time relative to dense summed over all sizes (dense counting 1 where it takes over),
        so a kernel much faster at decode beats one slightly faster everywhere."""
        alive = dict(candidates)
        ratios: dict[str, float] = dict.fromkeys(alive, 0.0)
        won_up_to: dict[str, int] = {}
        wins: dict[str, int] = dict.fromkeys(alive, 0)
        for tokens in self.tokens:
            if not alive:
                break
            x = _random_input(linear, tokens)
            for kernel in list(alive):  # a kernel may refuse only some token counts
                try:
                    self.runs_at(kernel, linear, alive[kernel], [tokens])
                except _Refused as exc:
                    reasons.append(str(exc))
                    del alive[kernel]
            if not alive:
                break
            contenders = {"dense": lambda x=x: linear(x)}
            contenders.update({k: (lambda x=x, m=m: m(x)) for k, m in alive.items()})
            try:
                with torch.inference_mode():
                    times = self.timer(contenders, tokens)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                reasons.append(f"timing at {tokens} tokens failed: {_first_line(exc)}")
                alive.clear()
                break
            for kernel, seconds in times.items():
                choice.timings_us.setdefault(kernel, {})[tokens] = round(seconds * 1e6, 1)
            for kernel in list(alive):
                if times[kernel] * self.margin >= times["dense"]:
                    reasons.append(f"{kernel} not faster than dense at {tokens} tokens")
                    del alive[kernel]
                else:
                    ratios[kernel] += times[kernel] / times["dense"]
                    won_up_to[kernel] = tokens
                    wins[kernel] += 1
        if not won_up_to:
            choice.reason = "; ".join(reasons)
            return choice, None
        best = min(won_up_to, key=lambda k: (ratios[k] + len(self.tokens) - wins[k], k))
        choice.kernel, choice.reason = best, "measured faster than dense"
        if best in alive:
            return choice, candidates[best]
        choice.max_tokens = won_up_to[best]
        choice.reason += f" up to {choice.max_tokens} tokens; dense above"
        return choice, SwitchedLinear(candidates[best], linear, choice.max_tokens)


def _guarded(what: str, call):
    """``call()``, with torch's late refusals turned into :class:`_Refused`."""
    try:
        return call()
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise _Refused(f"{what}: {_first_line(exc)}") from exc


def _random_input(linear: nn.Linear, tokens: int) -> torch.Tensor:
    weight = linear.weight
    return torch.randn(tokens, linear.in_features, dtype=weight.dtype, device=weight.device)


def _default_timer(device: torch.device, repeats: int = 5, inner: int = 3) -> Timer:
    """Per contender, the median over ``repeats`` rounds of the mean of ``inner`` calls
    (of one call with cold caches, for decode-sized calls on CPU: see COLD_MAX_TOKENS).

    Each round times every contender once, in turn, after one warm-up call each.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmed = False
    scratch: torch.Tensor | None = None  # allocated when first needed

    def flush_caches() -> None:
        nonlocal scratch
        if scratch is None:
            scratch = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.float32)
        scratch.fill_(1.0)

    def timer(contenders: dict[str, Callable[[], object]], tokens: int) -> dict[str, float]:
        nonlocal warmed
        cold = device.type == "cpu" and tokens <= COLD_MAX_TOKENS
        calls = 1 if cold else inner
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        # The very first calls pay for thread-pool and MKL start-up (~10 ms each here);
        # without a longer first warm-up the first layer's dense time looks 1000x too slow.
        for _ in range(1 if warmed else 20):
            for fn in contenders.values():
                fn()
        warmed = True
        for _ in range(repeats):
            for name, fn in contenders.items():
                if cold:
                    flush_caches()
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / calls)
        return {name: statistics.median(values) for name, values in samples.items()}

    return timer


def _matches_dense(linear: nn.Linear, module: nn.Module, tokens: int = 4) -> bool:
    """Whether ``module`` reproduces ``linear`` on a random input, within dtype tolerance."""
    weight = linear.weight
    x = torch.randn(1, tokens, linear.in_features, dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        expected = F.linear(x, weight, linear.bias).float()
        actual = module(x).float()
    if actual.shape != expected.shape:
        return False
    rtol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 1e-2
    scale = expected.abs().max().item() + 1e-6
    return (actual - expected).abs().max().item() <= rtol * scale
