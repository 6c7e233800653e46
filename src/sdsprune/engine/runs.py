"""Setting up a run's runtime for ``prune()``: low-memory stores, state folders, saving.

Kept out of ``prune.py`` so that the public entry point only plumbs options through.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sdsprune.engine.checkpoint import (
    Checkpointer,
    block_file,
    blocks_prefix,
    check_state_file,
    fingerprint,
    read_manifest,
    remove_state,
)
from sdsprune.engine.distributed import Distributed
from sdsprune.engine.lowmem import LowMemoryStore, SafetensorsSource, build_skeleton
from sdsprune.engine.memory_plan import MemoryPlan
from sdsprune.engine.runtime import BlockStore, Runtime
from sdsprune.errors import SdspruneError
from sdsprune.models.blocks import decoder_blocks

SHARD_INDEX = "model.safetensors.index.json"


def check_options(
    *, model, low_memory: bool, out, evaluate, state_dir, resume: bool, staged: bool
) -> None:
    """Refuse combinations that cannot work before any expensive step runs."""
    if low_memory and not isinstance(model, str | Path):
        raise SdspruneError("--low-memory loads the model itself: pass a model name or folder")
    if low_memory and out is None:
        raise SdspruneError("--low-memory writes the pruned blocks out as it goes: pass --out")
    if low_memory and evaluate:
        raise SdspruneError(
            "--low-memory cannot evaluate in the same run; evaluate the --out folder with "
            "`sdsprune eval`"
        )
    if resume and state_dir is None:
        raise SdspruneError("--resume needs the --state-dir of the interrupted run")
    if state_dir is not None and staged:
        raise SdspruneError(
            "--state-dir/--resume support one-shot methods and fused SDS, not the staged schedule"
        )


def load_skeleton(spec: str, dtype: torch.dtype):
    """A LoadedModel whose blocks stay on ``meta`` until their turn (see engine.lowmem)."""
    from transformers import AutoTokenizer

    from sdsprune.models import LoadedModel
    from sdsprune.models.loading import resolve_model_folder

    folder = resolve_model_folder(str(spec))
    if folder is None:
        raise SdspruneError("--low-memory needs a local checkpoint folder, not a hub id")
    net = build_skeleton(folder, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise SdspruneError(f"could not load the tokenizer in {folder}: {exc}") from exc
    return LoadedModel(model=net, tokenizer=tokenizer, spec=str(spec), path=folder)


def check_state(
    net: nn.Module,
    config: dict,
    windows: torch.Tensor,
    *,
    dist: Distributed | None,
    state_dir,
    resume: bool,
) -> None:
    """Before the memory plan is printed: a state folder that cannot be resumed (damaged,
    of another run, past the model's end) or that holds an unfinished run while not
    resuming is refused as one error, with nothing printed or written before it. Reads
    only the manifest and the files' headers; ``open_runtime`` reads the state itself."""
    if state_dir is None:
        return
    folder = Path(state_dir)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    manifest = read_manifest(folder)
    if manifest is None:
        if resume:
            raise SdspruneError(f"nothing to resume in {folder} (no saved state there)")
        return
    if not resume:
        raise SdspruneError(
            f"{folder} holds the state of an unfinished run; pass --resume to "
            "continue it, or delete the folder to start over"
        )
    if manifest["fingerprint"] != _fingerprint(config, windows, world):
        raise SdspruneError(
            f"the state in {folder} belongs to a run with other options or data; "
            "rerun with the same options, or delete it to start over"
        )
    done, blocks = manifest["done"], len(decoder_blocks(net))
    if done >= blocks:
        raise SdspruneError(
            f"the run state in {folder} says {done + 1} blocks are done, but the model "
            f"has {blocks}; delete the folder to start over"
        )
    files = [block_file(folder / "blocks", index) for index in range(done + 1)] if rank == 0 else []
    for path in [*files, folder / f"stream-rank{rank}-block{done:05d}.safetensors"]:
        check_state_file(path, folder)


def _fingerprint(config: dict, windows: torch.Tensor, world: int) -> str:
    # not the device: ranks differ in it (cuda:0, cuda:1), and moving is allowed
    return fingerprint({**config, "device": None, "processes": world}, windows)


@contextlib.contextmanager
def open_runtime(
    net: nn.Module,
    loaded,
    config: dict,
    windows: torch.Tensor,
    *,
    plan: MemoryPlan,
    dist: Distributed | None,
    low_memory: bool,
    out,
    state_dir,
    resume: bool,
) -> Iterator[Runtime]:
    """The runtime of one prune run, as the memory plan sizes it; removes scratch state
    when the run ends."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    checkpoint = None
    if state_dir is not None:
        checkpoint = Checkpointer(
            Path(state_dir),
            _fingerprint(config, windows, world),
            resume=resume,
            rank=rank,
            world=world,
            barrier=dist.barrier if dist is not None else None,
        )
    scratch = None
    store: BlockStore = BlockStore()
    if low_memory:
        if state_dir is not None:
            work = Path(state_dir) / ("blocks" if rank == 0 else f"blocks-rank{rank}")
        else:
            scratch = work = _scratch_dir(Path(out), rank)
        store = LowMemoryStore(
            SafetensorsSource(loaded.path),
            blocks_prefix(net),
            work,
            next(net.parameters()).dtype,
            done=checkpoint.done_blocks if checkpoint is not None else 0,
        )
    try:
        yield Runtime(
            store=store,
            dist=dist,
            checkpoint=checkpoint,
            offload_activations=plan.offload,
            tokens_per_batch=plan.batch * int(windows.shape[1]),
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def finish(runtime: Runtime, state_dir) -> None:
    """After the output is safely written: the saved state is no longer needed."""
    if runtime.dist is not None:
        runtime.dist.barrier()
    if state_dir is not None and runtime.is_main:
        remove_state(Path(state_dir))


def _scratch_dir(out: Path, rank: int) -> Path:
    """Blocks of a low-memory run go next to --out, so they can be hard-linked into it."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.blocks{rank}-", dir=parent))
    except OSError as exc:
        raise SdspruneError(f"cannot create a scratch folder next to {out}: {exc}") from exc


def layer_summary(store: LowMemoryStore) -> dict[str, float]:
    """Per-layer sparsity of a low-memory run (its weights are no longer in memory)."""
    return {name: zeros / max(total, 1) for name, (zeros, total) in store.layer_counts.items()}


def save_low_memory(tmp: Path, net: nn.Module, store: LowMemoryStore) -> None:
    """Write a sharded Hugging Face checkpoint: one shard per block (the files the run wrote,
    hard-linked when possible) and one for everything outside the blocks."""
    from safetensors.torch import save_file

    blocks = store.shard_files(net.config.num_hidden_layers)
    total = len(blocks) + 1
    weight_map: dict[str, str] = {}
    outside = _outside_tensors(net, store.prefix)
    first = f"model-00001-of-{total:05d}.safetensors"
    save_file(outside, str(tmp / first), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(outside, first))
    for number, path in enumerate(blocks, start=2):
        name = f"model-{number:05d}-of-{total:05d}.safetensors"
        _link_or_copy(path, tmp / name)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), name))
    size = sum((tmp / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2))
    net.config.save_pretrained(tmp)
    if getattr(net, "generation_config", None) is not None:
        net.generation_config.save_pretrained(tmp)


def _outside_tensors(net: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Persistent tensors outside the blocks, once each (tied head = embeddings)."""
    tensors, seen = {}, set()
    for name, tensor in net.state_dict().items():
        if name.startswith(prefix) or tensor.is_meta:
            continue
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    return tensors


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
