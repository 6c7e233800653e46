"""llama.cpp beside the torch backends in ``bench``: the checkpoint as GGUF, same token ids.

A CPU user who does not run a pruned model in torch runs the dense one in llama.cpp, so the
benchmark times it in the same run, on the same prompt ids, token counts and thread count:
the checkpoint is written as GGUF (f32, bf16, q8_0) into a temporary folder and timed by
``llama-cpp-python``. llama.cpp computes every weight, zero or not, so the GGUF of a pruned
checkpoint decodes exactly as fast as that of its dense model: these rows are the dense
model's speed in llama.cpp. Its high-level API decodes one sequence, so only batch 1 is
timed; without ``llama-cpp-python`` (an optional extra that builds llama.cpp) the rows are
skipped with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdsprune.errors import SdspruneError
from sdsprune.inference.llamacpp import LlamaCppRunner, llamacpp_problem, write_gguf

PEER_PRECISIONS = ("f32", "bf16", "q8_0")
PEER_PREFIX = "llama.cpp "


def peer_name(precision: str) -> str:
    return f"{PEER_PREFIX}{precision}"


def check_precisions(precisions: tuple[str, ...]) -> None:
    unknown = [p for p in precisions if p not in PEER_PRECISIONS]
    if unknown:
        raise SdspruneError(
            f"llama.cpp precisions must be among {', '.join(PEER_PRECISIONS)} "
            f"(got {', '.join(unknown)})"
        )


@dataclass
class PeerContender:
    """llama.cpp on one GGUF of the checkpoint, timed like a torch backend."""

    name: str
    runner: LlamaCppRunner
    samples: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)

    def runs(self, kind: str, mode: str, batch: int) -> bool:
        """Batch 1 only; its one decode path is timed under every decode mode of the run, so
        each mode's rows have it beside them."""
        return batch == 1

    def seconds(self, kind: str, mode: str, ids: torch.Tensor, settings, dev) -> float:
        """Prefill seconds, or decode seconds per token, as the torch backends are timed."""
        prompt = ids[0].tolist()
        if kind == "prefill":
            return self.runner.prefill_seconds(prompt)
        return self.runner.decode_seconds(prompt, settings.decode_tokens)


def start_peers(
    folder: Path,
    precisions: tuple[str, ...],
    workdir: Path,
    context: int,
    say: Callable[[str], None],
) -> tuple[list[PeerContender], dict[str, dict], dict[str, str]]:
    """The llama.cpp contenders (GGUFs written under ``workdir``), their load facts, and the
    reasons of those that cannot run."""
    problem = llamacpp_problem()
    if problem is not None:
        return [], {}, {peer_name(p): problem for p in precisions}
    peers, loads, skipped = [], {}, {}
    for precision in precisions:
        name = peer_name(precision)
        say(f"writing {folder.name} as a {precision} GGUF and loading it in llama.cpp")
        start = time.perf_counter()
        try:
            path = write_gguf(folder, workdir / f"model-{precision}.gguf", precision)
            runner = LlamaCppRunner(path, threads=torch.get_num_threads(), context=context)
        except SdspruneError as exc:  # an architecture the writer does not know, and such
            skipped[name] = str(exc)
            continue
        peers.append(PeerContender(name, runner))
        loads[name] = {
            "kernels": {"llama.cpp": precision},
            "load_seconds": round(time.perf_counter() - start, 2),
            "gguf_mib": round(path.stat().st_size / 2**20, 1),
        }
    return peers, loads, skipped


def greedy_agreement(peer: PeerContender, ids: torch.Tensor, dense_tokens: torch.Tensor) -> dict:
    """Whether llama.cpp's greedy tokens after ``ids`` equal dense torch's (its KV cache is
    f16 and its kernels round differently, so near-ties may flip even in f32)."""
    tokens = peer.runner.greedy_tokens(ids[0].tolist(), dense_tokens.shape[1])
    return {"same_greedy_tokens_as_dense": tokens == dense_tokens[0].tolist()}


def close_peers(peers: list[PeerContender]) -> None:
    for peer in peers:
        peer.runner.close()
