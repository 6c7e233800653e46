"""Several processes (``torchrun``) sharing one pruning run through ``torch.distributed``.

Each rank runs the blocks on its own slice of the calibration windows. Everything a pruner
reads is a sum over calibration tokens (Gram matrices, squared feature norms, the kd
cross-Grams, the output-error probes), so summing the ranks' partial sums with all-reduce
*before* dividing by the (also summed) token count gives the same statistics as one
process, up to floating-point summation order. Each layer is then pruned once, by its owner
rank, and the new weights are broadcast, so every rank continues with identical weights.

A rank that fails ends the run: it writes its error into the group's key-value store before
it leaves; every other rank raises that error (not its own "connection closed") when its
next collective fails, and a watcher thread ends a rank whose collective cannot notice (a
peer that is still alive; NCCL) ``ABORT_GRACE_SECONDS`` after the error appeared.
``SDSPRUNE_DIST_TIMEOUT`` (seconds) bounds every collective besides, in a group sdsprune
creates (torch's default otherwise: 30 minutes for gloo, 10 for NCCL).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from sdsprune.errors import SdspruneError

TIMEOUT_ENV = "SDSPRUNE_DIST_TIMEOUT"
ABORT_GRACE_SECONDS = 10.0  # a failed peer's error seen: time to end the way Python does
POLL_SECONDS = 0.5
_RUNS = itertools.count()  # distributed runs of this process; every rank counts the same


@dataclass
class Distributed:
    """This process's place in the group."""

    rank: int
    world: int
    device: torch.device  # where collective tensors must live (cuda for nccl, cpu for gloo)

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the windows (sizes differ by at most one)."""
        if windows.shape[0] < self.world:
            raise SdspruneError(
                f"{windows.shape[0]} calibration windows cannot be split across {self.world} "
                "processes (use --nsamples >= the number of processes)"
            )
        return torch.tensor_split(windows, self.world)[self.rank].contiguous()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (moved to the collective device if needed)."""
        if tensor.device == self.device:
            tdist.all_reduce(tensor)
            return tensor
        staged = tensor.to(self.device)
        tdist.all_reduce(staged)
        tensor.copy_(staged)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        packed = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(packed)
        return packed.tolist()

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        if tensor.device == self.device:
            tdist.broadcast(tensor, src=src)
            return
        staged = tensor.to(self.device)
        tdist.broadcast(staged, src=src)
        tensor.copy_(staged)

    def gather_objects(self, value) -> list:
        gathered = [None] * self.world
        tdist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        tdist.barrier()


def requested_world() -> int:
    """How many processes the launcher (torchrun) started; 1 outside a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def distributed_from_env(compute: torch.device) -> Iterator[Distributed | None]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on
    CUDA), and leave it at the end; yields None for a plain single-process run.

    Either way a CUDA compute device is the current device while the run lasts (each rank's
    own device; ``--device cuda:1`` in one process), so what reads the current device reads
    the one that computes: the stage meters' and the report's peak CUDA memory among them.
    """
    world = requested_world()
    if world <= 1:
        with _current_cuda_device(compute):
            yield None
        return
    created = not tdist.is_initialized()
    if compute.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if created:
        try:
            tdist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout()
            )
        except (RuntimeError, ValueError) as exc:
            raise SdspruneError(f"could not join the torch.distributed group: {exc}") from exc
    failures = _Failures(next(_RUNS), tdist.get_rank())
    try:
        with failures.watched():
            yield Distributed(rank=tdist.get_rank(), world=tdist.get_world_size(), device=device)
    except BaseException as exc:
        first = failures.announce(exc)  # before the group goes: peers read it when it does
        if first is None or not isinstance(exc, Exception):  # Ctrl-C stays Ctrl-C
            raise
        raise SdspruneError(first) from exc
    finally:
        if created:
            tdist.destroy_process_group()


def collective_timeout() -> timedelta | None:
    """``SDSPRUNE_DIST_TIMEOUT`` seconds, or None for torch's default. A rank may solve its
    share of a block's layers for minutes while the others wait in the broadcast, so the
    default is torch's, not something short."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise SdspruneError(f"{TIMEOUT_ENV}={value}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


class _Failures:
    """The first failure of a distributed run, shared through the group's key-value store
    (torchrun's agent holds it, so it outlives a failed rank)."""

    def __init__(self, run: int, rank: int):
        self.key = f"sdsprune/run{run}/failure"
        self.rank = rank
        self.store = _default_store()

    def announce(self, exc: BaseException) -> str | None:
        """Record this rank's failure unless one is recorded already; returns the message to
        raise instead of ``exc`` (another rank's, which came first), or None."""
        if self.store is None:
            return None
        detail = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        mine = f"{self.rank}|{type(exc).__name__}{': ' + detail if detail else ''}"
        try:
            first = self.store.compare_set(self.key, "", mine).decode()
        except Exception:  # the store went with a failed rank 0: keep this rank's own error
            return None
        return None if first == mine else _describe(first)

    def recorded(self) -> str | None:
        """Another rank's recorded failure, described; None while there is none."""
        try:
            if not self.store.check([self.key]):
                return None
            first = self.store.get(self.key).decode()
        except Exception:
            return None
        return None if first.partition("|")[0] == str(self.rank) else _describe(first)

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """A thread that ends this process when another rank has failed and this one did not
        end by itself within ``ABORT_GRACE_SECONDS`` (blocked in a collective that cannot
        notice; otherwise the collective raises and ``announce`` gives the first error)."""
        if self.store is None:
            yield
            return
        done = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(done,), daemon=True, name="sdsprune-failures"
        )
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _watch(self, done: threading.Event) -> None:
        while not done.wait(POLL_SECONDS):
            failure = self.recorded()
            if failure is None:
                continue
            if done.wait(ABORT_GRACE_SECONDS):
                return
            print(f"error: {failure} (this rank ended: it was waiting for it)", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)


def _describe(record: str) -> str:
    rank, _, error = record.partition("|")
    return f"rank {rank} failed: {error}"


def _default_store():
    """The process group's key-value store (a copy this module may use from a thread)."""
    try:
        return tdist.distributed_c10d._get_default_store().clone()
    except Exception:  # no store to share failures through: collectives still time out
        return None


def _current_cuda_device(compute: torch.device):
    """``compute`` made the current CUDA device (and the previous one restored after); nothing
    for a CPU device or a CUDA one without an index (that is the current device already)."""
    if compute.type != "cuda" or compute.index is None:
        return contextlib.nullcontext()
    if compute.index >= torch.cuda.device_count():
        raise SdspruneError(
            f"device {compute} does not exist: this machine has {torch.cuda.device_count()} "
            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.cuda.device(compute)


def reduce_stats(dist: Distributed, collector) -> None:
    """Sum a StatsCollector's raw sums and token counts over ranks (before ``finalize``).

    Groups are visited in sorted order so every rank issues the same collectives.
    """
    for group in sorted(collector.stats):
        stats = collector.stats[group]
        count = torch.tensor([stats.count], dtype=torch.float64, device=dist.device)
        dist.all_reduce_(count)
        stats.count = int(count.item())
        for tensor in (stats.gram, stats.sumsq, stats.total, collector.cross.get(group)):
            if tensor is not None:
                dist.all_reduce_(tensor)


def layer_owners(
    names: list[str], sizes: dict[str, int], world: int, pinned: set[str] = frozenset()
) -> dict[str, int]:
    """Assign layers to ranks, largest first onto the least loaded rank: deterministic, so
    every rank computes the same assignment without talking. ``pinned`` layers go to rank 0."""
    load = [0] * world
    owners = {}
    for name in sorted(names, key=lambda n: (n not in pinned, -sizes[n], n)):
        rank = 0 if name in pinned else min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners
