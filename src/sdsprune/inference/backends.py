"""Swap the pruned linear layers of a loaded model for sparse kernels, per layer.

Backends:

- ``dense``: leave the model alone (the default, and the baseline of every comparison);
- ``csr`` / ``bsr``: torch sparse CSR / BSR matmul on every pruned layer that can use it;
- ``nm24``: this package's AVX-512 / AVX2 CPU kernel for 2:4 layers (float32 or bfloat16,
  built on first use);
- ``bitmask``: this package's AVX-512 / AVX2 CPU kernel for any sparsity pattern (a bitmask
  and the kept values per row; float32 or bfloat16, built on first use);
- ``semi-structured``: torch's 2:4 kernels on CUDA GPUs of compute capability >= 8.0;
- ``auto``: per layer, time dense against each kernel available on the model's device at
  decode-sized and prefill-sized token counts, smallest first, and keep the kernel that beats
  dense by a margin up to the largest count. A kernel that wins only up to some count (decode,
  typically) is used for calls of up to that many tokens, and above that count the call
  rebuilds the dense weight for itself only (:class:`SwitchedLinear`): a sparse layer holds
  one copy of its weights, the packed one. Where sparse is slower at every count, the layer
  stays dense: sparse is never chosen on faith. On a CPU where this package's kernels
  build, the layers that stay dense, and the LM head, serve decode-sized calls (up to 4
  tokens) with a streaming kernel (:mod:`~sdsprune.inference.gemv`, 2-3x torch's batch-1
  GEMM) and prompts with torch's GEMM; the race times each sparse kernel against that.

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
from sdsprune.inference.gemv import MAX_GEMV_TOKENS, GemvLinear, gemv_problem
from sdsprune.inference.kernels import (
    KERNELS,
    PROBLEMS,
    SwitchedLinear,
    semi_structured_device_problem,
)
from sdsprune.models import model_linears

log = logging.getLogger(__name__)

BACKENDS = ("dense", "auto", "csr", "bsr", "nm24", "bitmask", "semi-structured")
MIN_SPARSITY = 0.3
AUTO_MARGIN = 1.05  # a sparse kernel must be >= 5% faster than dense to be chosen
# decode at batch 1, 4 and 8, a small prefill, a prompt; ascending: losers drop out early
PROBE_TOKENS = (1, 4, 8, 16, 512)
REPORT_ATTR = "sdsprune_backend"
# A decode step streams every weight from memory (the model is far larger than the caches),
# so auto times its layers as a forward pass runs them: each round calls every layer of a
# group once, in turn, so a layer's weights have left the caches by its next call. Timed in
# a loop, one layer's weights sit in cache and dense looks faster than in a model: on the
# default model with the AVX2 nm24 kernel, such timings kept 131 of 210 layers dense (nm24
# 0.81x at 1 token, median) although nm24 on every layer decoded 1.21x faster than dense in
# the same run (benchmarks/results/deploy-cpu-2of4-avx2-auto-loop-timed.json). Groups hold
# at least RACE_GROUP_BYTES of dense weights (far more than a last-level cache) and bound
# the memory of the candidates alive at once.
RACE_GROUP_BYTES = 256 * 2**20
RACE_ROUNDS = 5  # timed rounds per probe size (medians), after one untimed round

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
    weight_bytes: int = 0  # what the layer holds, in the form it runs with

    def label(self) -> str:
        """The kernel, with its token limit when dense takes the larger calls."""
        return self.kernel if self.max_tokens is None else f"{self.kernel}<={self.max_tokens}"


@dataclass
class BackendReport:
    """The outcome of :func:`apply_backend`, also stored on the model as ``sdsprune_backend``."""

    backend: str
    device: str
    layers: list[LayerChoice]
    weight_bytes: int = 0  # every parameter and buffer of the model after the swap
    head: str = "dense"  # what the LM head runs with (its label, as a layer's)

    def linear_bytes(self) -> int:
        """Bytes held by the prunable layers (what a decode step streams besides the head)."""
        return sum(layer.weight_bytes for layer in self.layers)

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
            "head": self.head,
            "weights_mib": round(self.weight_bytes / 2**20, 1),
            "layers": [asdict(layer) for layer in self.layers],
        }


def available_kernels(device: torch.device) -> list[str]:
    """Sparse kernels that can run on ``device`` (what ``bench`` offers by default)."""
    if device.type == "cuda":
        return ["semi-structured"] if semi_structured_device_problem(device) is None else []
    return ["csr", "bsr", "nm24", "bitmask"]


def auto_candidates(device: torch.device) -> list[str]:
    """The kernels ``auto`` races on ``device``.

    On a CPU where this package's kernels build, those (``bitmask`` for any pattern, ``nm24``
    for 2:4): torch's CSR holds an 8-byte value and index per kept weight against bitmask's
    4 bytes plus a bit per weight, and above its decode-sized limit it rebuilds the dense
    weight by a slow conversion, so a noisy decode timing that lets it win a layer costs
    memory and prompt speed (at 70%: 111 of 210 layers went to CSR in one run, prompts at
    0.56x dense). Where they cannot build, torch's CSR and BSR."""
    if device.type == "cpu" and _bitmask_problem_of_build() is None:
        return ["nm24", "bitmask"]
    return available_kernels(device)


def _bitmask_problem_of_build() -> str | None:
    from sdsprune.inference.bitmask import extension
    from sdsprune.inference.native import build_problem

    return build_problem(extension())


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
    dense_kernel: bool = True,
    fused_decode: bool = False,
) -> BackendReport:
    """Replace pruned decoder-block linears of ``model`` in place; return what was chosen.

    ``timer({kernel: fn}, tokens) -> {kernel: seconds}`` and ``converters`` (kernel -> module factory) are
    injectable so that the choice logic can be tested deterministically on a CPU.
    ``dense_kernel`` False keeps ``auto``'s dense layers and head on torch's GEMM.
    ``fused_decode`` (set by ``load`` when the model will decode through the fused step on
    a CPU) makes ``auto`` give every pruned layer the bitmask kernel without a race: the
    fused step streams packed rows as fast as dense ones, so the form with the fewest bytes
    makes the fastest step, while the race times eager calls, whose per-call costs the fused
    step does not have (on the 50% checkpoint of the default model, 13.99 against 15.22
    ms/token with the race's choice, one bench run).
    """
    if backend not in BACKENDS:
        raise SdspruneError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    device = model_device(model)
    if backend == "semi-structured" and converters is None:
        problem = semi_structured_device_problem(device)
        if problem:
            raise SdspruneError(f"backend 'semi-structured' unavailable: {problem}")
    factories = {**KERNELS, **(converters or {})}
    timer = timer or _default_timer(device)
    choices, group, places = [], [], []
    streamed = backend == "auto" and device.type == "cpu" and dense_kernel
    probe = _Probe(sorted(probe_tokens), margin, timer, verify, streamed)
    # auto for the fused step: the packed form, which reads the fewest bytes (see above)
    packed = backend == "auto" and fused_decode and device.type == "cpu"
    for name, linear, parent, attr in _prunable_layers(model):
        places.append((parent, attr))
        layer_backend = "bitmask" if packed else backend
        choice, module = _choose(
            name, linear, layer_backend, device, factories, min_sparsity, probe
        )
        if packed and module is not None:
            choice.reason = "auto for the fused decode step: the fewest bytes"
        if isinstance(module, _Race):
            group.append((module, parent, attr))
            if sum(weight_bytes(race.linear) for race, _, _ in group) >= RACE_GROUP_BYTES:
                _race_and_swap(probe, group)
                group = []
        elif module is not None:
            setattr(parent, attr, module)
        choices.append(choice)
    _race_and_swap(probe, group)
    for choice, (parent, attr) in zip(choices, places, strict=True):
        if streamed and choice.kernel == "dense":
            _stream_dense(choice, parent, attr)
        choice.weight_bytes = weight_bytes(getattr(parent, attr))
    head = _stream_head(model) if streamed else "dense"
    report = BackendReport(
        backend=backend,
        device=str(device),
        layers=choices,
        weight_bytes=weight_bytes(model),
        head=head,
    )
    setattr(model, REPORT_ATTR, report)
    log.info(
        "backend %s on %s: %s; weights %.1f MiB",
        backend,
        device,
        report.counts(),
        report.weight_bytes / 2**20,
    )
    return report


def _stream_dense(choice: LayerChoice, parent: nn.Module, attr: str) -> None:
    """Serve a layer that stays dense with the streaming kernel at decode sizes (if it can)."""
    linear = getattr(parent, attr)
    problem = gemv_problem(linear) if isinstance(linear, nn.Linear) else "not a linear"
    if problem is None:
        setattr(parent, attr, GemvLinear(linear))
        choice.kernel, choice.max_tokens = "gemv", MAX_GEMV_TOKENS


def _stream_head(model: nn.Module) -> str:
    """The LM head through the streaming kernel at decode sizes; its label.

    The head is the largest single weight of a small model (a 49k x 576 float32 head is
    113 MB, a fifth of the default model) and every decode step reads all of it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or gemv_problem(head) is not None:
        return "dense"
    model.set_output_embeddings(GemvLinear(head))
    return f"gemv<={MAX_GEMV_TOKENS}"


def _race_and_swap(probe: _Probe, group: list[tuple[_Race, nn.Module, str]]) -> None:
    """Race a group of layers together and swap in each one's winner (if any)."""
    probe.race([race for race, _, _ in group])
    for race, parent, attr in group:
        module = race.winner()
        if module is not None:
            setattr(parent, attr, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage once (tied weights),
    counting sparse tensors' index arrays too: what a loaded model keeps in memory."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for part in _storage_parts(tensor):
            try:
                key = (part.data_ptr(), part.numel())
            except RuntimeError:  # a wrapper subclass without storage of its own
                key = (id(part), part.numel())
            if key not in seen:
                seen.add(key)
                total += part.numel() * part.element_size()
    return total


def _storage_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    if type(tensor).__name__.startswith("SparseSemiStructured"):  # CUDA 2:4 subclass
        names, _ = tensor.__tensor_flatten__()
        return [part for n in names if (part := getattr(tensor, n, None)) is not None]
    return [tensor]


def backend_report(model: nn.Module) -> BackendReport | None:
    """The report of the last :func:`apply_backend` on ``model`` (None if never applied)."""
    return getattr(model, REPORT_ATTR, None)


def model_device(model: nn.Module) -> torch.device:
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
) -> tuple[LayerChoice, nn.Module | _Race | None]:
    """What a layer runs with: a module, None (dense), or for ``auto`` a :class:`_Race` of
    its verified candidates, decided later with the other layers of its group."""
    sparsity = _sparsity(linear)
    choice = LayerChoice(name=name, kernel="dense", sparsity=round(sparsity, 4))
    if backend == "dense":
        return choice, None
    if sparsity < min_sparsity:
        choice.reason = f"sparsity {sparsity:.0%} below {min_sparsity:.0%}"
        return choice, None
    kernels = auto_candidates(device) if backend == "auto" else [backend]
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
        return choice, _Race(choice, linear, candidates, reasons)
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
    streamed: bool = False  # dense layers stream at decode sizes: race against that

    def dense_for(self, linear: nn.Linear) -> nn.Module:
        """What the layer runs with if it stays dense (what a kernel must beat)."""
        if self.streamed and gemv_problem(linear) is None:
            return GemvLinear(linear)
        return linear

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

    def race(self, races: list[_Race]) -> None:
        """Time dense and the candidates of every layer at each probe size, smallest first.

        Per size, one untimed round and ``RACE_ROUNDS`` timed rounds each call every layer
        of the group once, in turn (see RACE_GROUP_BYTES); medians decide. A candidate not
        faster by the margin drops out (larger sizes are not timed for it)."""
        for tokens in self.tokens:
            running = [race for race in races if race.alive]
            inputs: dict[tuple, torch.Tensor] = {}  # one per layer shape, not one per layer
            for race in running:
                weight = race.linear.weight
                key = (race.linear.in_features, weight.dtype, weight.device)
                if key not in inputs:
                    inputs[key] = _random_input(race.linear, tokens)
                race.start(inputs[key], self)
                race.dense = race.dense or self.dense_for(race.linear)
            samples: dict[int, dict[str, list[float]]] = {id(race): {} for race in running}
            for round_ in range(RACE_ROUNDS + 1):
                for race in running:
                    times = race.time(tokens, self.timer)
                    if round_ == 0:  # untimed: first calls at a new size
                        continue
                    for kernel, seconds in times.items():
                        samples[id(race)].setdefault(kernel, []).append(seconds)
            for race in running:
                if race.alive:
                    medians = {k: statistics.median(v) for k, v in samples[id(race)].items()}
                    race.judge(tokens, medians, self.margin)


@dataclass
class _Race:
    """One layer's verified candidates in ``auto``'s race, and how they fared so far.

    A candidate that wins up to some size and then loses is used only up to that size, its
    expansion to dense above. The winner is the arrangement with the lowest time relative to
    dense summed over all probe sizes (above its limit, a kernel counts what it took where it
    lost, at least dense's 1), so a kernel much faster at decode beats one slightly faster
    everywhere, and of two decode winners the one with the cheaper expansion wins.
    """

    choice: LayerChoice
    linear: nn.Linear
    candidates: dict[str, nn.Module]
    reasons: list[str]
    alive: dict[str, nn.Module] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    won_up_to: dict[str, int] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)
    # time relative to dense at the first size a kernel lost: what its expansion path costs
    # where it no longer serves calls with the kernel itself
    lost_ratio: dict[str, float] = field(default_factory=dict)
    x: torch.Tensor | None = None
    dense: nn.Module | None = None  # the layer as it runs if it stays dense

    def __post_init__(self) -> None:
        self.alive = dict(self.candidates)

    def start(self, x: torch.Tensor, probe: _Probe) -> None:
        """Take the input of the next size; drop candidates that refuse that size."""
        self.x = x
        for kernel in list(self.alive):  # a kernel may refuse only some token counts
            try:
                probe.runs_at(kernel, self.linear, self.alive[kernel], [x.shape[0]])
            except _Refused as exc:
                self.reasons.append(str(exc))
                del self.alive[kernel]

    def time(self, tokens: int, timer: Timer) -> dict[str, float]:
        """One timing of dense and the live candidates ({} once none is left)."""
        if not self.alive:
            return {}
        x, dense = self.x, self.dense or self.linear
        contenders = {"dense": lambda: dense(x)}
        contenders.update({k: (lambda m=m: m(x)) for k, m in self.alive.items()})
        try:
            with torch.inference_mode():
                return timer(contenders, tokens)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            self.reasons.append(f"timing at {tokens} tokens failed: {_first_line(exc)}")
            self.alive.clear()
            return {}

    def judge(self, tokens: int, medians: dict[str, float], margin: float) -> None:
        """Record the medians of this size; drop candidates not faster than dense by the margin."""
        for kernel, seconds in medians.items():
            self.choice.timings_us.setdefault(kernel, {})[tokens] = round(seconds * 1e6, 1)
        for kernel in list(self.alive):
            if medians[kernel] * margin >= medians["dense"]:
                self.lost_ratio[kernel] = medians[kernel] / medians["dense"]
                self.reasons.append(f"{kernel} not faster than dense at {tokens} tokens")
                del self.alive[kernel]
                if kernel not in self.won_up_to:  # never useful: free its weights now
                    del self.candidates[kernel]
            else:
                self.ratios[kernel] = (
                    self.ratios.get(kernel, 0.0) + medians[kernel] / medians["dense"]
                )
                self.won_up_to[kernel] = tokens
                self.wins[kernel] = self.wins.get(kernel, 0) + 1

    def _cost(self, kernel: str, sizes: int) -> float:
        """Time relative to dense summed over the probe sizes: the kernel's where it won, its
        expansion path's (as timed where it lost; dense's if never timed) at the others."""
        above = max(1.0, self.lost_ratio.get(kernel, 1.0))
        return self.ratios[kernel] + (sizes - self.wins[kernel]) * above

    def winner(self) -> nn.Module | None:
        """The module the layer keeps (None: dense), with the choice's kernel and reason set."""
        choice = self.choice
        if not self.won_up_to:
            choice.reason = "; ".join(self.reasons)
            return None
        sizes = len(choice.timings_us.get("dense", {}))
        best = min(self.won_up_to, key=lambda k: (self._cost(k, sizes), k))
        choice.kernel, choice.reason = best, "measured faster than dense"
        if best in self.alive:
            return self.candidates[best]
        choice.max_tokens = self.won_up_to[best]
        choice.reason += f" up to {choice.max_tokens} tokens; expanded to dense above"
        return SwitchedLinear(self.candidates[best], choice.max_tokens)


def _guarded(what: str, call):
    """``call()``, with torch's late refusals turned into :class:`_Refused`."""
    try:
        return call()
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise _Refused(f"{what}: {_first_line(exc)}") from exc


def _random_input(linear: nn.Linear, tokens: int) -> torch.Tensor:
    weight = linear.weight
    return torch.randn(tokens, linear.in_features, dtype=weight.dtype, device=weight.device)


def _default_timer(device: torch.device) -> Timer:
    """Seconds of one call of each contender, in turn (the race repeats and takes medians).

    One call, not a loop: a loop would time the second and later calls with the layer's
    weights in cache (see RACE_GROUP_BYTES).
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmed = False

    def timer(contenders: dict[str, Callable[[], object]], _tokens: int) -> dict[str, float]:
        nonlocal warmed
        # The very first calls pay for thread-pool and MKL start-up (~10 ms each here);
        # without a longer first warm-up the first layer's dense time looks 1000x too slow.
        for _ in range(0 if warmed else 20):
            for fn in contenders.values():
                fn()
        warmed = True
        times = {}
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name] = time.perf_counter() - start
        return times

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
