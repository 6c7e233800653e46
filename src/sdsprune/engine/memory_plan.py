"""The memory and time plan of a pruning run, made before any block is touched.

A 70B model, or fp32 on a 24 GB card, does not fit the way a small model does: the
calibration activations alone are windows x seqlen x hidden values per stream (8 GiB for
128 x 2048 tokens of a hidden size of 8192 in fp32), the Gram matrices in² floats per
distinct layer input, and the solvers hold a few more in² matrices for the widest layer.
The plan adds these up per block from the model's shapes, says where each lives, decides
whether the activations must be offloaded to CPU memory, and refuses a run that would not
fit with one line that names the option that would make it fit, instead of an
out-of-memory crash hours in. Every figure is an estimate (an upper bound where the code
is not exact about sharing), printed and written to the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import block_linears, decoder_blocks

GIB = 2**30
HEADROOM = 0.9  # plan for 90% of the free memory: allocator fragmentation, CUDA context
LOGIT_COPIES = 8  # vocabulary-sized fp32 tensors alive in a distillation step (_distillation)
# layers that read one input tensor (the engine shares their statistic); others get their own
_SHARED_INPUTS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


@dataclass(frozen=True)
class MethodTerms:
    """What a pruning method adds to a block's memory and time, in the plan's own terms.

    Each method config reports its terms (``plan_terms()`` in :mod:`sdsprune.methods`), so
    the plan needs no method's name: a new method states what it holds and computes.
    """

    statistics: str = "gram"  # per-layer input statistics: none, sumsq or gram (in x in)
    factors_hessian: bool = False  # the pruner factors each input's Gram (OBS updates)
    redense: str | None = None  # a re-dense solve: "factored" (closed form) or "iterative"
    factorisations: int = 0  # in³ factorisations per distinct layer input (FLOPs)
    layer_products: int = 0  # out x in x in products per layer (FLOPs)
    dense_stream: bool = False  # the dense model runs alongside (kd/dd inputs, re-fit targets)
    dense_statistics: bool = False  # ... and its inputs' Grams and cross-Grams are collected
    block_epochs: int = 0  # each block is re-fitted with Adam for this many epochs ...
    block_windows: int = 0  # ... on this many of this process's windows (0: all of them) ...
    block_batch: int = 1  # ... this many windows a step
    staged: bool = False  # three passes over the model, with dense copies of every block
    distill_epochs: int = 0  # a last stage trains the whole model against the dense logits


@dataclass(frozen=True)
class PlanRequest:
    """What the plan depends on besides the model's shapes."""

    windows: int  # calibration windows this process holds
    seqlen: int
    batch: int
    terms: MethodTerms
    low_memory: bool = False
    offload: str = "auto"  # auto, on, off

    @property
    def block_refit(self) -> bool:
        return self.terms.block_epochs > 0

    @property
    def refit_tokens(self) -> int:
        """Tokens one re-fit epoch runs through the block (forward and backward)."""
        if not self.block_refit:
            return 0
        windows = min(self.terms.block_windows or self.windows, self.windows)
        return windows * self.seqlen

    @property
    def refit_on_every_window(self) -> bool:
        """Whether the re-fit trains on all windows: then every measurement keeps its outputs
        (the next block's inputs); on a subset (the default) only the last one does."""
        return self.block_refit and not 0 < self.terms.block_windows < self.windows

    @property
    def refit_step_windows(self) -> int:
        """Windows one re-fit step runs forward and backward at once: its mini-batch, in
        pieces of at most the forward batch."""
        return min(self.terms.block_batch, self.batch)


@dataclass
class MemoryPlan:
    """Bytes per item and where it lives; the peak on each side; the decision."""

    device: str
    items: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, where)
    offload: bool = False
    device_peak: int = 0
    host_extra: int = 0
    device_free: int | None = None
    host_available: int | None = None
    flops: float = 0.0
    flops_per_second: float | None = None
    batch: int = 1  # windows a block runs at once (its forward scratch grows with it)
    lowered_from: int | None = None  # the default batch, when it had to shrink to fit

    @property
    def seconds(self) -> float | None:
        return self.flops / self.flops_per_second if self.flops_per_second else None

    def describe(self) -> str:
        """A few lines for the terminal, printed before work starts."""
        lines = [f"memory plan on {self.device} (per block, estimates):"]
        for what, size, where in self.items:
            lines.append(f"  {what:<50} {_gib(size):>10}  {where}")
        free = "" if self.device_free is None else f" of {_gib(self.device_free)} free"
        lines.append(f"  peak on {self.device}: {_gib(self.device_peak)}{free}")
        if self.device != "cpu":
            available = "" if self.host_available is None else f" of {_gib(self.host_available)}"
            lines.append(f"  extra CPU memory: {_gib(self.host_extra)}{available} available")
        lines.append(f"  activations offloaded to CPU: {'yes' if self.offload else 'no'}")
        lowered = f" (lowered from {self.lowered_from} to fit)" if self.lowered_from else ""
        lines.append(f"  forward batch: {self.batch} window(s){lowered}")
        if self.seconds is not None:
            lines.append(
                f"  compute: {self.flops / 1e12:.1f} TFLOP, at least {_duration(self.seconds)} at "
                f"the measured matmul rate ({self.flops_per_second / 1e9:.0f} GFLOP/s)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["items"] = [{"what": w, "bytes": b, "where": p} for w, b, p in self.items]
        data["seconds"] = self.seconds
        return data


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB // 4 else f"{size / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class _Shapes:
    """The dimensions the plan needs, read from block 0 (works on ``meta`` blocks too)."""

    blocks: int
    hidden: int
    widest: int  # largest layer input width
    block_params: int  # all parameters of one block
    linear_params: int  # the prunable ones
    layers: list[tuple[str, int, int]]  # (name, out, in)
    group_inputs: list[int]  # input width of each distinct statistic
    heads: int
    dtype_bytes: int


def _shapes(net: nn.Module) -> _Shapes:
    blocks = decoder_blocks(net)
    block = blocks[0]
    linears = block_linears(block)
    layers = [(n, la.out_features, la.in_features) for n, la in linears.items()]
    groups: dict[str, int] = {}
    for name, _, width in layers:
        leaf = name.rsplit(".", 1)
        parent, short = (leaf[0], leaf[1]) if len(leaf) == 2 else ("", leaf[0])
        shared = next((g for g in _SHARED_INPUTS if short in g), None)
        groups[f"{parent}:{shared[0]}" if shared else name] = width
    config = getattr(net, "config", None)
    parameter = next(block.parameters())
    return _Shapes(
        blocks=len(blocks),
        hidden=int(getattr(config, "hidden_size", 0) or max(w for _, _, w in layers)),
        widest=max(w for _, _, w in layers),
        block_params=sum(p.numel() for p in block.parameters()),
        linear_params=sum(o * i for _, o, i in layers),
        layers=layers,
        group_inputs=list(groups.values()),
        heads=int(getattr(config, "num_attention_heads", 1) or 1),
        dtype_bytes=parameter.element_size(),
    )


def plan_run(
    net: nn.Module, request: PlanRequest, compute: torch.device, measure: bool = True
) -> MemoryPlan:
    """Estimate what one block needs and decide where the activations live.

    ``measure``: time a matmul on ``compute`` for the time estimate (a few milliseconds).
    """
    shapes = _shapes(net)
    plan = MemoryPlan(device=str(compute), batch=request.batch)
    terms = request.terms
    tokens = request.windows * request.seqlen
    batch_tokens = request.batch * request.seqlen
    dense_stream = terms.dense_stream
    refit = request.block_refit
    buffers = 1 + dense_stream + terms.staged + _refit_output_buffers(shapes, request)
    activations = buffers * tokens * shapes.hidden * shapes.dtype_bytes
    gram_sets = 1 + 2 * terms.dense_statistics
    grams = gram_sets * sum(4 * w * w for w in shapes.group_inputs)
    statistics = grams if terms.statistics == "gram" else 0
    weights = shapes.block_params * shapes.dtype_bytes + shapes.linear_params * 4
    kept_inputs = dense_stream and terms.dense_statistics  # kd's cross-Grams read them
    forward = _forward_scratch(shapes, request.batch, request.seqlen, kept_inputs)
    refit_note = ""
    if refit:  # the re-fit's fp32 forwards and backwards come after the statistics pass's
        forward = max(forward, _refit_forward(shapes, request))
        refit_note = "; the re-fit's in fp32, with autograd's"
    solver, cached = _solver_scratch(shapes, terms)
    solver = max(solver, _refit_scratch(shapes) if refit else 0)
    plan.device_free, plan.host_available = _free_memory(compute)
    fixed = weights + statistics + forward + solver + cached
    plan.offload = request.offload == "on" or (
        request.offload == "auto"
        and compute.type != "cpu"
        and plan.device_free is not None
        and activations + fixed > HEADROOM * plan.device_free
    )
    device, host = str(compute), "cpu"
    on_device = host if plan.offload else device
    plan.items = [
        (f"activations ({buffers} stream buffer(s), {tokens} tokens)", activations, on_device),
        ("block weights + fp32 copies of its linears", weights, device),
        ("statistics (Grams, cross-Grams)", statistics, device),
        (f"forward scratch ({batch_tokens} tokens a batch{refit_note})", forward, device),
        ("solver scratch (widest layer) + cached factors", solver + cached, device),
    ]
    if terms.staged and not request.low_memory:
        copies = shapes.blocks * shapes.linear_params * shapes.dtype_bytes
        plan.items.append(("staged: dense copies of every block (model dtype)", copies, host))
    plan.device_peak = sum(size for _, size, where in plan.items if where == device)
    plan.host_extra = sum(size for _, size, where in plan.items if where == host)
    plan.flops = shapes.blocks * _block_flops(shapes, request, tokens, dense_stream)
    if terms.distill_epochs:  # after the blocks: its peak replaces theirs, it does not add
        need, flops = _distillation(net, request)
        plan.items.append(("distillation stage (after the blocks; whole model)", need, device))
        plan.device_peak = max(plan.device_peak, need)
        plan.flops += flops
    if measure:
        plan.flops_per_second = _matmul_rate(compute)
    return plan


def _distillation(net: nn.Module, request: PlanRequest) -> tuple[int, float]:
    """Bytes and FLOPs of the distillation stage.

    Bytes: the model in fp32; its linears' gradients, Adam moments and the start snapshot
    (the stage keeps it to fall back to); the dense stream's last-block outputs (model
    dtype); and one training window's fp32 forward for the backward: autograd's saved
    activations in every block, one block's transient scratch, and ``LOGIT_COPIES``
    vocabulary-sized tensors (student and teacher logits and log-probabilities, the KL's
    terms, their gradients). On the first GPU run (H200, SmolLM2-135M, bf16, 512-token
    windows) the stage peaked at 3793 MiB where the plan, counting neither the snapshot,
    autograd's saved activations nor half the logit copies, said 2873; this one says 3605.
    FLOPs: per training window a forward and backward of the pruned model and the head once
    more (the dense logits), plus the held-out forwards each epoch."""
    parameters = sum(p.numel() for p in net.parameters())
    dtype_bytes = next(net.parameters()).element_size()
    shapes = _shapes(net)
    linears = shapes.blocks * shapes.linear_params
    vocab = int(getattr(net.config, "vocab_size", 0) or 0)
    seqlen = request.seqlen
    window = (
        LOGIT_COPIES * seqlen * vocab * 4
        + shapes.blocks * _autograd_saved(shapes, seqlen)
        + _block_forward(shapes, 1, seqlen, 4)
    )
    tokens = request.windows * seqlen
    dense_outputs = tokens * shapes.hidden * dtype_bytes
    need = parameters * 4 + 4 * linears * 4 + window + dense_outputs
    flops = request.terms.distill_epochs * 2 * parameters * tokens * (3 + 1 / 8)
    return need, flops


def _forward_scratch(shapes: _Shapes, batch: int, seqlen: int, kept_inputs: bool) -> int:
    """One batch of the statistics pass through one block: its forward in the model dtype,
    the fp32 copy of each layer input the hooks read, and one in x in product before it is
    added to its Gram (with the dense model's statistics, its inputs are kept too: kd's
    cross-Grams read them; a dense stream for the re-fit's targets alone keeps none)."""
    tokens = batch * seqlen
    hooks = tokens * shapes.widest * 4 + 4 * shapes.widest**2
    kept = tokens * sum(shapes.group_inputs) * 4 if kept_inputs else 0
    return _block_forward(shapes, batch, seqlen, shapes.dtype_bytes) + hooks + kept


def _block_forward(shapes: _Shapes, batch: int, seqlen: int, dtype_bytes: int) -> int:
    """One forward's transient scratch at ``dtype_bytes`` a value: hidden states and MLP
    intermediates, and an attention score matrix."""
    intermediate = max(o for _, o, _ in shapes.layers)
    activations = batch * seqlen * (6 * shapes.hidden + 3 * intermediate) * dtype_bytes
    return activations + batch * shapes.heads * seqlen * seqlen * dtype_bytes


def _refit_forward(shapes: _Shapes, request: PlanRequest) -> int:
    """The re-fit's forwards, all in fp32 whatever the model's dtype: a training step's
    forward keeps autograd's saved activations for its backward beside its own scratch; an
    error measurement runs a forward batch without them."""
    step = request.refit_step_windows
    train = _block_forward(shapes, step, request.seqlen, 4)
    train += _autograd_saved(shapes, step * request.seqlen)
    measure = _block_forward(shapes, request.batch, request.seqlen, 4)
    return max(train, measure)


def _autograd_saved(shapes: _Shapes, tokens: int) -> int:
    """What autograd keeps of a block's fp32 forward for the backward, per token: each
    distinct layer input (the weight gradients read it), each layer's output (attention and
    the MLP's non-linearity read theirs), the two norms' inputs and the MLP's gated product,
    and a few values a token: the rotary tables, the norms' scales, attention's softmax
    statistics. A tiny Llama block (hidden 64) keeps all of that, one of hidden 256 about
    5.25 hidden + 2 kv + 4 intermediate values against the 8 hidden here (CPU, SDPA). The
    attention scores, which the math attention kernel keeps too, are in the forward's own
    scratch."""
    intermediate = max(o for _, o, _ in shapes.layers)
    outputs = sum(o for _, o, _ in shapes.layers)
    small = 2 * (shapes.hidden // shapes.heads) + 2 + shapes.heads
    per_token = sum(shapes.group_inputs) + outputs + 2 * shapes.hidden + intermediate + small
    return tokens * per_token * 4


def _refit_output_buffers(shapes: _Shapes, request: PlanRequest) -> int:
    """Stream-sized buffers the re-fit holds: on every window, the kept and the latest
    measurement's outputs for an fp32 block; on a subset, only the last measurement's (the
    earlier ones run the subset alone); for a bf16/fp16 block only the rounded block's (its
    fp32 measurements keep none)."""
    if not request.block_refit:
        return 0
    return 2 if shapes.dtype_bytes >= 4 and request.refit_on_every_window else 1


def _solver_scratch(shapes: _Shapes, terms: MethodTerms) -> tuple[int, int]:
    """(transient scratch of the widest layer's solve, factors cached for the block)."""
    out, width = max(
        ((o, i) for _, o, i in shapes.layers), key=lambda oi: oi[0] * oi[1] + oi[1] ** 2
    )
    if terms.factors_hessian:
        base = 2 * out * width * 4 + out * width + 3 * width * width * 4
        cached = sum(4 * w * w for w in shapes.group_inputs)
    else:  # scores, mask, selected values and int64 indices of half the entries
        base, cached = out * width * (4 + 1 + 6), 0
    if terms.redense is None:
        return base, cached
    factored = terms.redense == "factored"
    closed = 2 * width * width * 8 + 3 * out * width * 8 if factored else 0
    iterative = 8 * out * width * 4  # start, target, iterates, momentum, best, gradient
    if factored:
        cached += sum(8 * w * w for w in shapes.group_inputs)
    return max(base, closed, iterative), cached


def _refit_scratch(shapes: _Shapes) -> int:
    """The block re-fit's own memory: the gradient and Adam's two moments, the best weights
    so far (fp32) and the masks over the linears, the start weights in the model's dtype for
    a bf16/fp16 block (kept if the rounded block is worse), and the whole block in fp32
    while it trains (2 more bytes a parameter for a bf16 model). Its forward and backward
    scratch is the forward's item; the solvers' statistics are dropped before it starts."""
    start = shapes.dtype_bytes if shapes.dtype_bytes < 4 else 0
    per_linear = 4 + 8 + 4 + 1 + start
    return shapes.linear_params * per_linear + shapes.block_params * (4 - shapes.dtype_bytes)


def _block_flops(shapes: _Shapes, request: PlanRequest, tokens: int, dense: bool) -> float:
    """Matmul FLOPs of one block: forwards, Gram accumulation, factorisations, solver steps."""
    terms = request.terms
    passes = (2 + dense) * (3 if terms.staged else 1)
    forward = passes * _forward_flops(shapes, tokens, request.seqlen)
    grams = (1 + 2 * terms.dense_statistics) * sum(2 * tokens * w * w for w in shapes.group_inputs)
    factor = sum(2 * w**3 for w in shapes.group_inputs)
    per_layer = sum(2 * o * i * i for _, o, i in shapes.layers)  # one (out x in x in) product
    solves = terms.factorisations * factor + terms.layer_products * per_layer
    return forward + grams + solves + _refit_flops(shapes, request)


def _refit_flops(shapes: _Shapes, request: PlanRequest) -> float:
    """The block re-fit: per epoch a forward and a backward (about twice the forward) over
    its windows, and the block error measured before the first epoch and after each (a
    bf16/fp16 block's once more: after the cast back); the last measurement runs every
    window in place of the output pass, counted in the block's passes."""
    if not request.block_refit:
        return 0.0
    epochs = request.terms.block_epochs
    measurements = epochs + (shapes.dtype_bytes < 4)
    return (3 * epochs + measurements) * _forward_flops(
        shapes, request.refit_tokens, request.seqlen
    )


def _forward_flops(shapes: _Shapes, tokens: int, seqlen: int) -> float:
    """One forward of the block over ``tokens`` tokens in windows of ``seqlen``."""
    return 2 * shapes.block_params * tokens + 4 * tokens * seqlen * shapes.hidden


def fit_plan(
    net: nn.Module, request: PlanRequest, compute: torch.device
) -> tuple[MemoryPlan, PlanRequest]:
    """The plan at the largest forward batch that fits, with the request it was made for.

    The batch only sets how many windows run through a block at once (its attention and MLP
    scratch), not what is computed, so a run that would not fit at the default batch runs at
    a smaller one rather than being refused: an SDS kd prune of an 8B-shaped block needs
    18.8 GiB at 4 windows of 2048 tokens. When even one window does not fit, the batch-1 plan
    comes back and ``check_plan`` says what would make it fit.
    """
    for batch in _batches_down_from(request.batch, request.windows):
        fitted = replace(request, batch=batch)
        plan = plan_run(net, fitted, compute, measure=False)
        if _shortfall(plan, fitted) is None:
            break
    if plan.batch != request.batch:
        plan.lowered_from = request.batch
    plan.flops_per_second = _matmul_rate(compute)
    return plan, fitted


def _batches_down_from(batch: int, windows: int) -> list[int]:
    """Batches that divide the windows evenly (every batch the same shape), largest first."""
    return [b for b in range(batch, 0, -1) if windows % b == 0]


def check_plan(plan: MemoryPlan, request: PlanRequest) -> None:
    """Refuse, with one line naming what would make it fit, a run the plan says cannot."""
    message = _shortfall(plan, request)
    if message is not None:
        raise SdspruneError(message)


def _shortfall(plan: MemoryPlan, request: PlanRequest) -> str | None:
    """Why the plan does not fit, and what would make it fit; None when it fits."""
    on_gpu = plan.device != "cpu"
    if on_gpu and plan.device_free is not None and plan.device_peak > HEADROOM * plan.device_free:
        if not plan.offload:
            hint = "pass --offload-activations on to keep the activations in CPU memory"
        else:
            hint = "use fewer/shorter calibration windows (--nsamples, --seqlen) or a larger GPU"
        return (
            f"this run needs about {_gib(plan.device_peak)} on {plan.device} but "
            f"{_usable(plan.device_free, 'free')}: {hint}"
        )
    host_need = plan.host_extra if on_gpu else plan.device_peak  # on CPU: one and the same
    if plan.host_available is not None and host_need > HEADROOM * plan.host_available:
        hint = "lower --nsamples or --seqlen"
        if request.terms.staged and not request.low_memory:
            hint = "use --low-memory (the staged dense copies are then read from disk) or " + hint
        return (
            f"this run needs about {_gib(host_need)} more CPU memory but "
            f"{_usable(plan.host_available, 'available')}: {hint}"
        )
    return None


def _usable(free: int, word: str) -> str:
    """What a run may plan for, said with the total it comes from: a refusal that printed
    only the total read as "needs 18.80 GiB but 18.97 GiB are available"."""
    usable = _gib(int(HEADROOM * free))
    return f"may use only {usable} ({HEADROOM:.0%} of the {_gib(free)} {word})"


def _free_memory(compute: torch.device) -> tuple[int | None, int | None]:
    """(free memory of the compute device, available CPU memory), None where unknown."""
    host = _meminfo_available()
    if compute.type == "cuda":
        free, _total = torch.cuda.mem_get_info(compute)
        return int(free), host
    return host, host


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _matmul_rate(compute: torch.device) -> float:
    """FLOP/s of an fp32 matmul on ``compute`` (best of three; the solvers run in fp32)."""
    size = 2048 if compute.type == "cuda" else 512
    a = torch.randn(size, size, device=compute)
    best = math.inf
    for _ in range(3):
        if compute.type == "cuda":
            torch.cuda.synchronize(compute)
        start = time.perf_counter()
        a @ a
        if compute.type == "cuda":
            torch.cuda.synchronize(compute)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)
