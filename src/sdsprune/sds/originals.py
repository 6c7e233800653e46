"""The dense weights the staged schedule needs after the model itself has moved on."""

from __future__ import annotations

import torch
from torch import nn

from sdsprune.engine.lowmem import LowMemoryStore
from sdsprune.engine.runtime import BlockStore
from sdsprune.models.blocks import block_linears, decoder_blocks


class DenseOriginals:
    """Each block's dense linear weights, for the staged schedule's later passes (the
    blocks then carry an earlier stage's weights).

    In memory they are kept on the CPU in the model's own dtype: an fp32 copy would add
    4 bytes per weight (28 GB for an 8B model) where bf16 needs 2. A ``--low-memory`` run
    keeps nothing: the checkpoint it reads blocks from still holds the dense weights, so
    they are read back from disk when a block's turn comes.
    """

    def __init__(self, net: nn.Module, store: BlockStore):
        self.blocks = decoder_blocks(net)
        self.store = store if isinstance(store, LowMemoryStore) else None
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None

    def keep(self, index: int, linears: dict[str, nn.Linear]) -> None:
        """Remember block ``index``'s weights before its first change (not needed on disk)."""
        if self.store is None:
            self.kept[index] = {
                name: layer.weight.detach().to("cpu", copy=True) for name, layer in linears.items()
            }

    def block(self, index: int) -> dict[str, torch.Tensor]:
        """The dense weights of block ``index`` in the model's dtype, on the CPU."""
        if self.store is None:
            return self.kept[index]
        if self._last is None or self._last[0] != index:  # one read per block and pass
            own = f"{self.store.prefix}{index}."
            names = list(block_linears(self.blocks[index]))
            tensors = self.store.source.read([f"{own}{name}.weight" for name in names])
            weights = {name: tensors[f"{own}{name}.weight"].to(self.store.dtype) for name in names}
            self._last = (index, weights)
        return self._last[1]

    def weight(self, index: int, name: str, like: torch.Tensor) -> torch.Tensor:
        """One layer's dense weight in fp32 on ``like``'s device (what the solvers use)."""
        return self.block(index)[name].to(like.device).float()

    @property
    def nbytes(self) -> int:
        """Memory held by the copies (0 in a low-memory run)."""
        return sum(w.numel() * w.element_size() for b in self.kept.values() for w in b.values())
