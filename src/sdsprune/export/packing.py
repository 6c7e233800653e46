"""Pure tensor encodings of pruned weights: packed bitmasks and N:M packing.

A pruned ``(out, in)`` weight is stored as the smallest of three encodings:

- ``dense``: unchanged (no zeros worth compressing);
- ``bitmask``: the non-zero values in row-major order plus one bit per position;
- ``nm``: for every group of ``m`` consecutive inputs of a row, exactly ``n`` values and
  their ``n`` positions inside the group, each packed into ``ceil(log2 m)`` bits.

Zeros are "numerical" zeros (``w == 0``). A pruner that writes ``w * mask`` leaves ``-0.0``
behind; its sign bits go into an extra ``negzero`` bitmask (only when there are any), so the
decoded tensor is bit-identical to the input, not merely equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NM_CANDIDATE_GROUPS = (4, 8)
NM_SLACK = 1.05


@dataclass(frozen=True)
class Encoded:
    """One weight in its stored form: named parts (suffix -> tensor) plus metadata."""

    encoding: str  # "dense", "bitmask" or "nm"
    parts: dict[str, torch.Tensor]
    meta: dict

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts.values())


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape, read row-major) into uint8, 8 per byte, LSB first."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean tensor."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:count].bool()


def pack_ints(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack small non-negative integers into ``width`` bits each (LSB first)."""
    if 8 % width == 0:  # fast path (2:4 uses 2 bits): whole fields per byte
        per_byte = 8 // width
        flat = values.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % per_byte
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, width, dtype=torch.uint8)
        return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    shifts = torch.arange(width, dtype=torch.int64)
    bits = (values.reshape(-1, 1).to(torch.int64) >> shifts) & 1
    return pack_bits(bits.bool())


def unpack_ints(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_ints`: ``count`` integers as int64."""
    if 8 % width == 0:
        shifts = torch.arange(0, 8, width, dtype=torch.uint8)
        fields = (packed.reshape(-1, 1) >> shifts) & ((1 << width) - 1)
        return fields.reshape(-1)[:count].to(torch.int64)
    bits = unpack_bits(packed, count * width).view(count, width).to(torch.int64)
    return (bits << torch.arange(width, dtype=torch.int64)).sum(dim=1)


def _as_int(tensor: torch.Tensor) -> torch.Tensor:
    """Same bits as an integer tensor: exact copies, and faster scatters than half types."""
    return tensor.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    )


def index_bits(m: int) -> int:
    """Bits needed for a position inside a group of ``m`` (2 for 2:4, 3 for 4:8)."""
    return max(1, math.ceil(math.log2(m)))


def nm_pattern(weight: torch.Tensor, m: int) -> int | None:
    """The smallest ``n`` such that every group of ``m`` inputs has at most ``n`` non-zeros.

    None when the input width is not a multiple of ``m`` or no group size saving exists
    (``n == m``).
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        return None
    groups = (weight != 0).view(weight.shape[0], -1, m)
    n = int(groups.sum(dim=2).max().item()) if groups.numel() else 0
    return n if n < m else None


def _negzero_part(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sign bits of ``-0.0`` entries, stored only when the tensor has any."""
    negzero = (weight == 0) & torch.signbit(weight)
    return {"negzero": pack_bits(negzero)} if bool(negzero.any()) else {}


def _restore_negzero(dense: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "negzero" in parts:
        mask = unpack_bits(parts["negzero"], dense.numel()).view(dense.shape)
        dense[mask] = -0.0
    return dense


def encode_bitmask(weight: torch.Tensor) -> Encoded:
    """Non-zero values (row-major) plus a packed bitmask of where they go."""
    mask = weight != 0
    parts = {"values": weight[mask].contiguous(), "mask": pack_bits(mask), **_negzero_part(weight)}
    meta = {"nnz": int(mask.sum().item())}
    return Encoded("bitmask", parts, meta)


def decode_bitmask(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    values = parts["values"]
    numel = math.prod(shape)
    mask = unpack_bits(parts["mask"], numel).view(shape)
    dense = torch.zeros(shape, dtype=values.dtype)
    _as_int(dense)[mask] = _as_int(values)
    return _restore_negzero(dense, parts)


def encode_nm(weight: torch.Tensor, n: int, m: int) -> Encoded:
    """Exactly ``n`` values per group of ``m`` inputs, with their in-group positions.

    Groups with fewer than ``n`` non-zeros are padded with zero slots (lowest positions
    first), so every group has the same layout, which is what 2:4 kernels expect.
    """
    rows, cols = weight.shape
    groups = weight.view(rows, cols // m, m)
    nonzero = groups != 0
    # Rank inside the group: non-zeros first, then zeros, each in position order; the
    # first n ranks are kept. Boolean selection then yields ascending positions.
    nz = nonzero.to(torch.int16)
    count = nz.sum(dim=2, keepdim=True)
    rank = torch.where(nonzero, nz.cumsum(2) - 1, count + (1 - nz).cumsum(2) - 1)
    keep = rank < n
    values = groups[keep].view(rows, -1)
    positions = torch.arange(m, dtype=torch.uint8).expand_as(groups)[keep]
    width = index_bits(m)
    parts = {"values": values, "indices": pack_ints(positions, width), **_negzero_part(weight)}
    meta = {"n": n, "m": m, "index_bits": width, "nnz": int(count.sum().item())}
    return Encoded("nm", parts, meta)


def decode_nm(
    parts: dict[str, torch.Tensor], shape: tuple[int, ...], n: int, m: int
) -> torch.Tensor:
    rows, cols = shape
    values = parts["values"].view(rows, cols // m, n)
    count = rows * (cols // m) * n
    positions = unpack_ints(parts["indices"], count, index_bits(m)).view(rows, cols // m, n)
    dense = torch.zeros(rows, cols // m, m, dtype=values.dtype)
    _as_int(dense).scatter_(2, positions, _as_int(values))
    return _restore_negzero(dense.view(rows, cols), parts)


def nm_nbytes(shape: tuple[int, int], n: int, m: int, itemsize: int) -> int:
    slots = shape[0] * (shape[1] // m) * n
    return slots * itemsize + math.ceil(slots * index_bits(m) / 8)


def bitmask_nbytes(numel: int, nnz: int, itemsize: int) -> int:
    return nnz * itemsize + math.ceil(numel / 8)


def encode_weight(weight: torch.Tensor) -> Encoded:
    """The encoding of ``weight``: N:M when its zeros follow such a pattern, else the smaller
    of bitmask and dense.

    A detected N:M pattern with n/m <= 1/2 (2:4, 4:8, 1:4 ...) is kept even when the bitmask
    would be a little smaller (4:8 needs 3 index bits per value; a few extra zeros shrink the
    bitmask), because the structure is what N:M kernels use. Looser patterns (7:8 found on
    unstructured sparsity) are kept only within 5% of the bitmask size. Sizes are computed
    first so that only the chosen encoding is built.
    """
    weight = weight.detach().cpu().contiguous()
    dense = Encoded("dense", {"weight": weight}, {})
    if weight.dim() != 2 or not weight.is_floating_point():
        return dense
    nnz = int((weight != 0).sum().item())
    if nnz == weight.numel():
        return dense
    itemsize, dense_bytes = weight.element_size(), weight.numel() * weight.element_size()
    bitmask_bytes = bitmask_nbytes(weight.numel(), nnz, itemsize)
    structured = [
        (nm_nbytes(weight.shape, n, m, itemsize), n, m)
        for m in NM_CANDIDATE_GROUPS
        if (n := nm_pattern(weight, m)) is not None
    ]
    if structured:
        nbytes, n, m = min(structured)
        structured_enough = 2 * n <= m or nbytes <= NM_SLACK * bitmask_bytes
        if structured_enough and nbytes < dense_bytes:
            return encode_nm(weight, n, m)
    return encode_bitmask(weight) if bitmask_bytes < dense_bytes else dense


def decode_weight(
    encoding: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], meta: dict
) -> torch.Tensor:
    """Inverse of :func:`encode_weight`."""
    if encoding == "dense":
        return parts["weight"]
    if encoding == "bitmask":
        return decode_bitmask(parts, shape)
    if encoding == "nm":
        return decode_nm(parts, shape, int(meta["n"]), int(meta["m"]))
    raise ValueError(f"unknown encoding {encoding!r}")
