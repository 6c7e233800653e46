"""Drop-in replacements for ``nn.Linear`` that multiply with a sparse weight.

Each kernel has an eligibility check that returns a reason string (None when the layer can
use it), so that callers can report *why* a layer stayed dense, and so the checks are
testable on a CPU-only machine even for the CUDA-only 2:4 path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sdsprune.export.packing import nm_pattern

BSR_BLOCK = 16
MIN_ZERO_BLOCKS = 0.3
# Strictest shape rule over torch's CUTLASS and cuSPARSELt 2:4 kernels for fp16/bf16.
SEMI_STRUCTURED_ROWS = 32
SEMI_STRUCTURED_COLS = 64
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


class SparseLinear(nn.Module):
    """Base of the sparse kernels: flattens leading dimensions and adds the bias."""

    kernel = "sparse"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product through the dense weight, rebuilt for this call only (many tokens)."""
        return F.linear(x, self.dense_weight(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@torch.library.custom_op("sdsprune::compressed_mm", mutates_args=())
def compressed_mm(
    x2d: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int
) -> torch.Tensor:
    """``x2d @ W.t()`` for the CSR (1-d values) or BSR (3-d values) weight ``W`` with ``rows``
    rows, given by its parts: what compiled code calls, as torch.compile cannot hold a sparse
    tensor. Rebuilding ``W`` around the parts copies nothing."""
    make = torch.sparse_csr_tensor if values.dim() == 1 else torch.sparse_bsr_tensor
    weight = make(crow, col, values, (rows, x2d.shape[1]))
    return torch.sparse.mm(weight, x2d.t()).t().contiguous()


@compressed_mm.register_fake
def _compressed_mm_fake(
    x2d: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int
) -> torch.Tensor:
    return x2d.new_empty((x2d.shape[0], rows))


class CompressedLinear(SparseLinear):
    """Base of the CSR and BSR kernels: a compressed sparse weight, multiplied by torch.

    The weight's parts are also plain buffers (views of the same memory) for compiled code,
    which passes them to :func:`compressed_mm`; eager calls skip that op's dispatch.
    """

    def _keep(self, weight: torch.Tensor) -> None:
        self.register_buffer("weight_sparse", weight, persistent=False)
        # detached: dynamo refuses views whose base is a sparse tensor
        self.register_buffer("crow", weight.crow_indices().detach(), persistent=False)
        self.register_buffer("col", weight.col_indices().detach(), persistent=False)
        self.register_buffer("nonzeros", weight.values().detach(), persistent=False)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_sparse.to_dense()

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return compressed_mm(x2d, self.crow, self.col, self.nonzeros, self.out_features)
        return torch.sparse.mm(self.weight_sparse, x2d.t()).t()


class CsrLinear(CompressedLinear):
    """Weight in compressed sparse rows with int32 indices (MKL sparse matmul on CPU).

    int32 rather than torch's default int64 indices: at 50% density they make the CSR
    weight as large as the dense one instead of 1.5x.
    """

    kernel = "csr"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, not news
            warnings.simplefilter("ignore", UserWarning)
            self._keep(_to_csr(linear.weight.detach()))


def _to_csr(weight: torch.Tensor) -> torch.Tensor:
    csr = weight.to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32),
        csr.col_indices().to(torch.int32),
        csr.values(),
        csr.shape,
    )


class BsrLinear(CompressedLinear):
    """Weight in block sparse rows: pays off only when whole blocks are zero."""

    kernel = "bsr"

    def __init__(self, linear: nn.Linear, block: int = BSR_BLOCK) -> None:
        super().__init__(linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self._keep(linear.weight.detach().to_sparse_bsr((block, block)))


class SemiStructuredLinear(SparseLinear):
    """2:4 weight in torch's semi-structured format (CUTLASS / cuSPARSELt, CUDA sm80+).

    ``converter`` is injectable so the module plumbing can be tested without a GPU.
    """

    kernel = "semi-structured"

    def __init__(self, linear: nn.Linear, converter=None) -> None:
        super().__init__(linear)
        if converter is None:
            from torch.sparse import to_sparse_semi_structured as converter
        sparse = converter(linear.weight.detach().contiguous())
        self.weight = nn.Parameter(sparse, requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear dispatches to the sparse kernel (which pads the token dimension itself);
        # the bias goes in the same call so it is fused where the kernel supports it.
        shape = x.shape
        y = F.linear(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


class SwitchedLinear(nn.Module):
    """A sparse kernel for calls of up to ``max_tokens`` tokens, its prompt path above.

    What ``auto`` keeps where a kernel wins only for few tokens (decode) and its prompt path
    for many: the token count of each call picks the path at run time. Above the limit the
    kernel's ``dense_forward`` serves the call from the packed weight (bitmask: multiplied
    from the packed form, or its dense rows rebuilt tile by tile for that call only; nm24:
    rebuilt likewise), so the layer holds one copy of its weights: the packed one.
    """

    def __init__(self, sparse: nn.Module, max_tokens: int) -> None:
        super().__init__()
        self.sparse = sparse
        self.max_tokens = max_tokens
        self.kernel = getattr(sparse, "kernel", "sparse")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[-1], 1)
        return self.sparse(x) if tokens <= self.max_tokens else self.sparse.dense_forward(x)

    def extra_repr(self) -> str:
        return f"up to {self.max_tokens} tokens: {self.kernel}, above: its prompt path"


def csr_problem(linear: nn.Linear) -> str | None:
    """Why the CSR kernel cannot serve this layer (None when it can)."""
    weight = linear.weight
    if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        return f"CPU sparse matmul has no {str(weight.dtype).removeprefix('torch.')} kernel"
    return None


def zero_block_fraction(weight: torch.Tensor, block: int = BSR_BLOCK) -> float:
    rows, cols = weight.shape
    if rows % block or cols % block:
        return 0.0
    blocks = (weight != 0).view(rows // block, block, cols // block, block).any(dim=(1, 3))
    return 1.0 - blocks.float().mean().item()


def bsr_problem(linear: nn.Linear, block: int = BSR_BLOCK) -> str | None:
    """Why the BSR kernel cannot serve this layer (None when it can)."""
    problem = csr_problem(linear)
    if problem:
        return problem
    fraction = zero_block_fraction(linear.weight.detach(), block)
    if fraction < MIN_ZERO_BLOCKS:
        return f"only {fraction:.0%} of {block}x{block} blocks are all zero"
    return None


def semi_structured_device_problem(device: torch.device) -> str | None:
    """Why torch's 2:4 kernels cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return "2:4 semi-structured kernels need a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"2:4 kernels need compute capability >= 8.0 (this GPU is {major}.{minor})"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def semi_structured_problem(linear: nn.Linear) -> str | None:
    """Why a layer's weight cannot use the 2:4 kernels (device aside)."""
    weight = linear.weight.detach()
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return "2:4 kernels need float16 or bfloat16 weights (load with dtype float16/bfloat16)"
    rows, cols = weight.shape
    if rows % SEMI_STRUCTURED_ROWS or cols % SEMI_STRUCTURED_COLS:
        return (
            f"shape {rows}x{cols} is not a multiple of "
            f"{SEMI_STRUCTURED_ROWS}x{SEMI_STRUCTURED_COLS}"
        )
    n = nm_pattern(weight.cpu(), 4)
    if n is None or n > 2:
        return "zeros are not in a 2:4 pattern"
    return None


def _nm24_linear(linear: nn.Linear) -> nn.Module:
    from sdsprune.inference.nm24 import Nm24Linear

    return Nm24Linear(linear)


def _nm24_problem(linear: nn.Linear) -> str | None:
    from sdsprune.inference.nm24 import nm24_problem

    return nm24_problem(linear)


def _bitmask_linear(linear: nn.Linear) -> nn.Module:
    from sdsprune.inference.bitmask import BitmaskLinear

    return BitmaskLinear(linear)


def _bitmask_problem(linear: nn.Linear) -> str | None:
    from sdsprune.inference.bitmask import bitmask_problem

    return bitmask_problem(linear)


KERNELS = {
    "csr": CsrLinear,
    "bsr": BsrLinear,
    "nm24": _nm24_linear,
    "bitmask": _bitmask_linear,
    "semi-structured": SemiStructuredLinear,
}
PROBLEMS = {
    "csr": csr_problem,
    "bsr": bsr_problem,
    "nm24": _nm24_problem,
    "bitmask": _bitmask_problem,
    "semi-structured": semi_structured_problem,
}
