"""Resumable runs: the state after every block, and continuing from it after a crash.

After block ``k`` the state folder holds the weights of blocks ``0..k`` (one safetensors
file per block), the activation stream(s) entering block ``k+1`` (one file per rank) and a
manifest with the per-layer records and a fingerprint of the run's configuration and
calibration windows. Files are written first and the manifest last, each by an atomic
rename, so a kill at any instant leaves the previous consistent state behind.

Everything is stored as safetensors, which holds tensors only: a tampered state file can
be refused as corrupt but can never run code when it is read back. The folder carries
sdsprune's marker (see sdsprune.ownership), and cleaning up deletes only ``STATE_FILES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sdsprune.engine.capture import ActivationStream
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import decoder_blocks
from sdsprune.ownership import (
    WRITE_ERRORS,
    check_state_folder,
    claim_state_folder,
    describe_write_error,
    remove_state_folder,
)

MANIFEST = "manifest.json"
FAULT_ENV = "SDSPRUNE_FAULT"  # testing aid: "kill@N" or "pause@N" after block N
FAULT_FILE_ENV = "SDSPRUNE_FAULT_FILE"  # written when the fault triggers
# What a run writes into its state folder (glob patterns), and so all that cleanup deletes.
STATE_FILES = (
    MANIFEST,
    "stream-rank*-block*.safetensors",
    ".*.tmp-*",
    "blocks/block-*.safetensors",
    "blocks/.*.tmp-*",
    "blocks-rank*/block-*.safetensors",
    "blocks-rank*/.*.tmp-*",
)
STATE_SUBFOLDERS = ("blocks", "blocks-rank*")


def fingerprint(config: dict, windows: torch.Tensor) -> str:
    """Identifies a run: resuming with other options or other windows must be refused."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def blocks_prefix(model: nn.Module) -> str:
    """Module path of the decoder blocks with a trailing dot, e.g. ``model.layers.``."""
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}."
    raise SdspruneError("could not locate the decoder blocks inside the model")


def block_file(folder: Path, index: int) -> Path:
    return folder / f"block-{index:05d}.safetensors"


def block_tensors(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The block's state under its model-level names (``model.layers.3.mlp...``)."""
    return {
        f"{prefix}{name}": tensor.detach().to("cpu").contiguous()
        for name, tensor in block.state_dict().items()
    }


def write_atomic(path: Path, write) -> None:
    """Write through a temporary sibling and rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as exc:
        tmp.unlink(missing_ok=True)
        raise SdspruneError(
            f"could not write run state {path}: {describe_write_error(exc)}"
        ) from exc


def save_block(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def load_block_into(block: nn.Module, path: Path, prefix: str) -> None:
    tensors = load_file(str(path))
    state = {key.removeprefix(prefix): value for key, value in tensors.items()}
    block.load_state_dict(state, strict=True)


class Checkpointer:
    """Saves the state after each block and restores it when resuming (see module doc)."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        *,
        resume: bool,
        rank: int = 0,
        world: int = 1,
        barrier=None,
    ):
        self.folder = Path(folder)
        self.blocks_dir = self.folder / "blocks"
        self.fingerprint = fingerprint
        self.rank = rank
        self.world = world
        self.barrier = barrier or (lambda: None)
        check_state_folder(self.folder)
        self.manifest = self._read_manifest() if resume else None
        if resume and self.manifest is None:
            raise SdspruneError(f"nothing to resume in {self.folder} (no saved state there)")
        if self.manifest is not None and self.manifest["fingerprint"] != fingerprint:
            raise SdspruneError(
                f"the state in {self.folder} belongs to a run with other options or data; "
                "rerun with the same options, or delete it to start over"
            )
        if not resume and self._read_manifest() is not None:
            raise SdspruneError(
                f"{self.folder} holds the state of an unfinished run; pass --resume to "
                "continue it, or delete the folder to start over"
            )
        if rank == 0:  # one process makes and marks the folder, the others wait for it
            claim_state_folder(self.folder)
        self.barrier()
        try:
            self.blocks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SdspruneError(f"cannot create state folder {self.folder}: {exc}") from exc

    @property
    def done_blocks(self) -> int:
        """Blocks finished in the pass being resumed (0 when starting fresh)."""
        return 0 if self.manifest is None else self.manifest["done"] + 1

    def restore(
        self,
        pass_index: int,
        blocks: nn.ModuleList,
        prefix: str,
        stream: ActivationStream,
        dense_stream: ActivationStream | None,
        weights_in_store: bool,
    ) -> tuple[int, dict[str, dict]]:
        """Bring the model and streams to the saved state; returns (next block, records)."""
        if self.manifest is None or self.manifest["pass"] != pass_index:
            return 0, {}
        done = self.manifest["done"]
        if done >= len(blocks):
            raise SdspruneError(
                f"the run state in {self.folder} says {done + 1} blocks are done, but the model "
                f"has {len(blocks)}; delete the folder to start over"
            )
        if self.rank == 0:
            self._check_block_files(done)
        if not weights_in_store:
            for index in range(done + 1):
                load_block_into(
                    blocks[index], block_file(self.blocks_dir, index), f"{prefix}{index}."
                )
        saved = self._load_stream(done, stream.hidden.device, dense_stream is not None)
        stream.hidden = saved["hidden"].to(stream.hidden.dtype)
        if dense_stream is not None:
            dense_stream.hidden = saved["dense"].to(dense_stream.hidden.dtype)
        return done + 1, self.manifest["records"]

    def save(
        self,
        pass_index: int,
        index: int,
        block: nn.Module,
        prefix: str,
        stream: ActivationStream,
        dense_stream: ActivationStream | None,
        records: dict[str, dict],
        weights_in_store: bool,
    ) -> None:
        """Record that ``block`` (index) is done; called after it went back home."""
        if not weights_in_store and self.rank == 0:
            save_block(
                block_file(self.blocks_dir, index), block_tensors(block, f"{prefix}{index}.")
            )
        payload = {"hidden": stream.hidden.detach().cpu()}
        if dense_stream is not None:
            payload["dense"] = dense_stream.hidden.detach().cpu()
        write_atomic(self._stream_path(index), lambda tmp: save_file(payload, str(tmp)))
        self.barrier()  # every rank's stream is on disk before the manifest points at it
        if self.rank == 0:
            manifest = {
                "fingerprint": self.fingerprint,
                "pass": pass_index,
                "done": index,
                "records": records,
                "world": self.world,
                "saved_at": time.time(),
            }
            text = json.dumps(manifest, default=float)
            write_atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(text))
        self._stream_path(index - 2).unlink(missing_ok=True)

    def _check_block_files(self, done: int) -> None:
        """Every saved block is there and whole (safetensors checks its header against the
        file's size, so this reads no weights): a damaged state is one clear error."""
        for index in range(done + 1):
            check_state_file(block_file(self.blocks_dir, index), self.folder)

    def _stream_path(self, index: int) -> Path:
        return self.folder / f"stream-rank{self.rank}-block{index:05d}.safetensors"

    def _load_stream(self, index: int, device: torch.device, dense: bool) -> dict:
        """The saved activation stream(s); a missing or damaged file is one clear error."""
        path = self._stream_path(index)
        try:
            saved = load_file(str(path), device=str(device))
        except Exception as exc:  # safetensors raises its own error type on damaged files
            raise SdspruneError(
                f"unreadable run state {path} ({exc}); delete {self.folder} to start over"
            ) from exc
        wanted = {"hidden", "dense"} if dense else {"hidden"}
        if not wanted <= saved.keys():
            raise SdspruneError(f"run state {path} lacks {sorted(wanted - saved.keys())}")
        return saved

    def _read_manifest(self) -> dict | None:
        return read_manifest(self.folder)


def read_manifest(folder: Path) -> dict | None:
    """A run state's manifest, or None when there is none; a damaged one is refused."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdspruneError(f"unreadable run state {path}: {exc}") from exc
    if not _well_formed(manifest):
        raise SdspruneError(
            f"damaged run state {path} (not the manifest sdsprune writes); delete "
            f"{folder} to start over"
        )
    return manifest


def _well_formed(manifest: object) -> bool:
    """The manifest has the fields, of the types, that ``Checkpointer.save`` writes."""

    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (
        isinstance(manifest, dict)
        and isinstance(manifest.get("fingerprint"), str)
        and count(manifest.get("pass"))
        and count(manifest.get("done"))
        and isinstance(manifest.get("records"), dict)
    )


def remove_state(folder: Path) -> None:
    """After the output is safely written: delete what the run wrote into its state
    folder (and the folder, if the run created it), nothing else."""
    remove_state_folder(folder, STATE_FILES, STATE_SUBFOLDERS)


def inject_fault(index: int) -> None:
    """Testing aid (``SDSPRUNE_FAULT=kill@N`` / ``pause@N``): after block N, die at once
    like a killed process, or announce it in ``SDSPRUNE_FAULT_FILE`` and wait (for a test
    to send Ctrl-C)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or "@" not in spec:
        return
    action, _, block = spec.partition("@")
    if int(block) != index:
        return
    marker = os.environ.get(FAULT_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{action} after block {index}\n")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        time.sleep(120)


def check_state_file(path: Path, folder: Path) -> None:
    """The file is there and whole: safetensors checks its header against the file's size,
    so this reads no tensors (a truncated or foreign file is refused)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # missing file, or safetensors' own error type
        raise SdspruneError(
            f"unreadable run state {path} ({exc}); delete {folder} to start over"
        ) from exc
