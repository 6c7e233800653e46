"""Greedy decode steps in two modes, to measure per-token overhead apart from the weights.

- ``eager``: transformers' dynamic KV cache (grown every step) and every op dispatched from
  Python, as ``model(token, cache=...)`` runs by default;
- ``static``: transformers' ``StaticCache`` (allocated once for the whole sequence and
  updated in place, so that every step has the same shapes) and the one-token step compiled
  by ``torch.compile`` (one graph, static shapes: one compilation per batch size);
- ``fused``: the same static cache, and the step as one C++ loop over the blocks
  (:mod:`sdsprune.inference.fused`; Llama-family models on the CPU, nothing to compile).

Prefill runs eagerly in every mode: it is one call per sequence, and compiling it for each
prompt length would cost more than it saves. Like ``generate``, it asks the model for the
last position's logits only (``logits_to_keep=1``, where the model's forward takes it): the
logits of every prompt position would cost a (tokens x vocab) head product and buffer
(200 MB for 8 x 128 tokens of a 49k vocabulary) that generation never reads.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from sdsprune.inference.fused import FusedDecoder, cache_problem
from sdsprune.utils import cache_keyword

DECODE_MODES = ("eager", "static", "fused")

# Before each compiled step dynamo checks guards on every module attribute the graph read:
# about 4 ms per step on the default model (2,000 captured calls), as much as all its other
# overhead. A loaded model is not changed between decode steps, so the guards on modules are
# dropped; swapping a model's layers after its first compiled step needs a new compile
# (``torch._dynamo.reset()``) instead of being noticed.
_FEW_GUARDS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}

# (last-token ids (batch, 1), cache) -> (last-position logits (batch, vocab), next ids (batch, 1))
Step = Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


def new_cache(model: nn.Module, mode: str, max_tokens: int) -> object:
    """An empty KV cache for ``mode``; a static one holds ``max_tokens`` positions.

    The dynamic cache is the one the model would create itself when given none.
    """
    from transformers import DynamicCache, StaticCache

    if mode in ("static", "fused"):
        return StaticCache(config=model.config, max_cache_len=max_tokens)
    return DynamicCache(config=model.config)


def prefill(model: nn.Module, ids: torch.Tensor, cache: object) -> torch.Tensor:
    """Fill ``cache`` with the prompt ``ids`` (eagerly); return the greedy next ids."""
    keywords = {cache_keyword(model): cache, **_last_position_only(model)}
    logits = model(ids, use_cache=True, **keywords).logits[:, -1]
    return logits.argmax(dim=-1, keepdim=True)


def _last_position_only(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` for models whose forward takes it (transformers' causal LMs do
    since 4.50); older or custom models compute every position's logits."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Read once per class: prefill is timed, and the signature does not change."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def eager_step(model: nn.Module) -> Step:
    """One decode step: the model on one new token per sequence, then the greedy choice.

    The choice is part of the step so that a compiled step includes it too.
    """
    keyword = cache_keyword(model)

    def step(token: torch.Tensor, cache: object) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(token, use_cache=True, **{keyword: cache}).logits[:, -1]
        return logits, logits.argmax(dim=-1, keepdim=True)

    return step


def compiled_step(model: nn.Module, name: str, backend: str = "inductor") -> Step:
    """:func:`eager_step` under ``torch.compile``: whole graph, static shapes.

    Compilation happens on the first call of each batch size, so callers warm it up before
    timing. ``fullgraph`` makes any graph break (an op dynamo cannot trace) an error on that
    first call rather than a silently slower step. The step gets a code object of its own,
    named after ``name``: dynamo keeps compiled graphs, and its limit of 8 recompilations,
    per code object, so with one shared step every backend's call would first test the
    guards of the other backends' graphs, and five backends at two batch sizes would pass
    the limit.
    """
    step = eager_step(model)
    code = step.__code__.replace(co_name=f"decode_step_{name}")
    own = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
    return torch.compile(own, backend=backend, fullgraph=True, dynamic=False, options=_FEW_GUARDS)


def fused_step(model: nn.Module) -> Step:
    """:func:`eager_step` as the fused C++ step on a static cache (raises ``ValueError``
    with the reason for a model it cannot serve, see
    :func:`~sdsprune.inference.fused.fused_problem`)."""
    decoder = FusedDecoder(model)

    def step(token: torch.Tensor, cache: object) -> tuple[torch.Tensor, torch.Tensor]:
        problem = cache_problem(cache, token.shape[0])
        if problem is not None:
            raise ValueError(problem)
        logits = decoder(token[:, 0], cache)
        return logits, logits.argmax(dim=-1, keepdim=True)

    return step


def compile_generation(model: nn.Module, backend: str = "inductor") -> None:
    """Make ``model.generate()`` decode with a static KV cache and a compiled step.

    transformers compiles the one-token forward when the cache is static, but by default
    only on accelerators; on a CPU the compiled step cuts the per-token cost of everything
    but the weights (dispatch, norms, rotary, the cache update) from about 8 ms to 2 ms on
    the default model (benchmarks/results/sparse-cpu). The prompt still runs eagerly. The
    first ``generate`` call per batch size and cache length compiles (a minute on 2 cores;
    torch's cache makes later processes faster). ``mode=None`` (torch's default; transformers'
    "reduce-overhead", means CUDA graphs, which a CPU has no use for). See ``_FEW_GUARDS``
    for the one thing a user must not do afterwards.
    """
    from transformers import CompileConfig

    compile_config = CompileConfig(
        fullgraph=True, dynamic=False, backend=backend, mode=None, options=_FEW_GUARDS
    )
    compile_config._compile_all_devices = True  # a class attribute, not a constructor field
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config


def compile_failure(exc: BaseException) -> str:
    """One line naming why compiling (or running) a step failed, e.g. ``InductorError:
    InvalidCxxCompiler: No working C++ compiler found ...``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no message'}"
