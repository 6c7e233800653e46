"""Decode steps as one C++ loop over a Llama-family model's blocks (CPU).

At one token per sequence a step of the default model reads its weights once (13 MiB at
50% sparsity in float32) and does almost no other work, yet a compiled step spends 5-10 ms
around the weights: the Python wrapper of the graph and its size checks, about 200 small
kernels and op calls, and SDPA, which expands the grouped KV cache to every query head
before each layer's attention. The fused step is the whole forward pass of a decode step
in C++ (:mod:`~sdsprune.inference.step_source`): RMSNorm, q/k/v through the layers' own
kernels (dense rows, bitmask or 2:4), rotary, the KV-cache write, attention over the cached
positions only, the SiLU MLP, the LM head. Activations stay float32 (a bfloat16 model's
weights and cache stay bfloat16; its activations are rounded to bfloat16 where the
bfloat16 dot-product kernel reads them, so its logits differ from transformers' bfloat16
forward by bfloat16 rounding).

It serves Llama, Mistral and Qwen2 models (SmolLM2 is a Llama) whose linears are plain
``nn.Linear``, :class:`~sdsprune.inference.gemv.GemvLinear`,
:class:`~sdsprune.inference.bitmask.BitmaskLinear` or
:class:`~sdsprune.inference.nm24.Nm24Linear` on the CPU in float32 or bfloat16, with input
widths in whole chunks of 16. :func:`fused_problem` names what keeps any other model out.

:func:`enable_fused_decode` puts it under ``model.generate()``: the model's forward sends
one-token calls on a static cache to the fused step and everything else (the prompt, other
caches, outputs it does not compute such as hidden states) to the model's own forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

from sdsprune.inference.bitmask import CHUNK, BitmaskLinear, extension
from sdsprune.inference.gemv import GemvLinear
from sdsprune.inference.kernels import SwitchedLinear
from sdsprune.inference.native import build_problem
from sdsprune.inference.nm24 import Nm24Linear, rows_per_task

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_BLOCK_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
KIND_DENSE, KIND_BITMASK, KIND_NM24 = 0, 1, 2
# rotary scalings whose frequencies change with the sequence length (the others are fixed
# at load, so the step reads them once)
_MOVING_ROPE = ("dynamic", "longrope")


def fused_problem(model: nn.Module) -> str | None:
    """Why the fused step cannot serve ``model`` (None when it can)."""
    config = model.config
    if config.model_type not in FUSED_MODEL_TYPES:
        return (
            f"the fused step serves {', '.join(FUSED_MODEL_TYPES)} models, not {config.model_type}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the fused step computes SiLU MLPs, not {config.hidden_act}"
    rope = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", None)
    if rope in _MOVING_ROPE:
        return (
            f"the fused step keeps the rotary frequencies fixed ({rope} rotary scaling moves them)"
        )
    if _sliding_window(config):
        return "the fused step attends over the whole cache (this model has a sliding window)"
    problem = build_problem(extension())
    if problem is not None:
        return problem
    for name, linear in _plan_linears(model):
        reason = _linear_problem(linear)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def _sliding_window(config) -> bool:
    """Whether transformers gives this model's static cache sliding-window layers (Mistral
    v0.1's 4096 positions; Qwen2 only with ``use_sliding_window``)."""
    if getattr(config, "model_type", "") == "qwen2" and not getattr(
        config, "use_sliding_window", False
    ):
        return False
    return bool(getattr(config, "sliding_window", None))


def _plan_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear the step reads, in plan order, with its name."""
    found = []
    for index, layer in enumerate(model.model.layers):
        for part, name in _BLOCK_LINEARS:
            module = getattr(getattr(layer, part), name)
            found.append((f"layers.{index}.{part}.{name}", _served_by(module)))
    found.append(("lm_head", _served_by(model.lm_head)))
    return found


def _served_by(module: nn.Module) -> nn.Module:
    """The module that serves one-token calls (a switched layer's sparse kernel)."""
    return module.sparse if isinstance(module, SwitchedLinear) else module


def _linear_problem(module: nn.Module) -> str | None:
    if not isinstance(module, (nn.Linear, GemvLinear, BitmaskLinear, Nm24Linear)):
        return f"{type(module).__name__} layers are not fused"
    if module.in_features % CHUNK:
        return f"inputs must come in whole chunks of {CHUNK} (this layer: {module.in_features})"
    stored = module.values if isinstance(module, (BitmaskLinear, Nm24Linear)) else module.weight
    if stored.device.type != "cpu" or stored.dtype not in (torch.float32, torch.bfloat16):
        return "the fused step reads float32 or bfloat16 weights on the CPU"
    return None


def _linear_entry(module: nn.Module) -> tuple[list[int], list[torch.Tensor]]:
    """The plan's ints (kind, grain, has bias) and tensors for one linear."""
    if isinstance(module, BitmaskLinear):
        kind, grain = KIND_BITMASK, 0
        tensors = [module.values, module.offsets, module.masks]
    elif isinstance(module, Nm24Linear):
        kind, grain = KIND_NM24, rows_per_task(module.values.shape[1], 1)
        tensors = [module.values, module.positions]
    else:
        kind, grain = KIND_DENSE, 0
        tensors = [module.weight.detach().contiguous()]
    bias = module.bias
    if bias is not None:
        tensors.append(bias.detach())
    return [kind, grain, int(bias is not None)], tensors


class FusedDecoder:
    """The C++ plan of one model: call it with one token per sequence and a static cache."""

    def __init__(self, model: nn.Module) -> None:
        problem = fused_problem(model)
        if problem is not None:
            raise ValueError(problem)
        config, body = model.config, model.model
        attention = body.layers[0].self_attn
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = attention.head_dim
        ints = [
            len(body.layers),
            config.hidden_size,
            heads,
            kv_heads,
            head_dim,
            config.intermediate_size,
        ]
        tensors = [body.rotary_emb.inv_freq, body.embed_tokens.weight.detach()]
        for layer in body.layers:
            tensors += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        tensors.append(body.norm.weight)
        tensors = [t.detach() for t in tensors]
        for _, linear in _plan_linears(model):
            entry_ints, entry_tensors = _linear_entry(linear)
            ints += entry_ints
            tensors += entry_tensors
        floats = [
            float(body.norm.variance_epsilon),
            float(attention.scaling),
            float(getattr(body.rotary_emb, "attention_scaling", 1.0)),
        ]
        self.plan = torch.classes.sdsprune.DecodePlan(tensors, ints, floats)

    def __call__(
        self,
        ids: torch.Tensor,
        cache: object,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits (batch, vocab) of ``ids`` (batch,), their keys and values written
        into the filled static ``cache`` (see :func:`cache_problem`) after its last position.
        ``positions`` (batch,): their rotary positions (None: that cache position);
        ``attention_mask``: 2-d, or 4-d with one query row, of the positions each sequence
        attends to (None: all)."""
        layers = cache.layers
        index = int(layers[0].cumulative_length)
        if positions is None:
            positions = layers[0].cumulative_length.expand(ids.shape[0])
        keep = _keep_mask(attention_mask, index + 1)
        return self.plan.step(
            ids,
            positions.reshape(-1),
            index,
            _EMPTY if keep is None else keep,
            [layer.keys for layer in layers],
            [layer.values for layer in layers],
            [layer.cumulative_length for layer in layers],
        )


def cache_problem(cache: object, batch: int) -> str | None:
    """Why the fused step cannot decode into ``cache`` (None when it can): it writes into
    transformers' plain static cache layers, filled by a prompt, with room left."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return "the fused step decodes into a static cache without sliding windows"
    if not all(layer.is_initialized for layer in layers):
        return "the fused step decodes after a prompt has filled the cache"
    keys = layers[0].keys
    if keys.shape[0] != batch or int(layers[0].cumulative_length) >= keys.shape[2]:
        return "the static cache has no room for another token of this batch"
    return None


_EMPTY = torch.empty(0, 0, dtype=torch.uint8)


def enable_fused_decode(model: nn.Module) -> None:
    """Make ``model.generate()`` (and any one-token forward on a filled static cache)
    decode through the fused step; raise ``ValueError`` with the reason where it cannot."""
    decoder = FusedDecoder(model)
    model.generation_config.cache_implementation = "static"
    model.forward = _fused_forward(model.forward, decoder)


def _fused_forward(forward: Callable, decoder: FusedDecoder) -> Callable:
    """``forward`` with one-token calls on a filled static cache sent to ``decoder``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers 5.x passes (and returns) the cache as ``cache``, 4.x as ``past_key_values``
    fields = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    output_name = "cache" if "cache" in fields else "past_key_values"

    @functools.wraps(forward)
    def fused(input_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rest = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        if not _is_fused_step(input_ids, cache, rest):
            return forward(input_ids=input_ids, **kwargs)
        logits = decoder(
            input_ids[:, 0], cache, rest.get("position_ids"), rest.get("attention_mask")
        )
        return CausalLMOutputWithPast(logits=logits.unsqueeze(1), **{output_name: cache})

    return fused


# keyword arguments of a decode step that the fused step honours (the rest send the call
# to the model's own forward)
_HANDLED = {
    "attention_mask",
    "position_ids",
    "cache_position",
    "use_cache",
    "return_dict",
    "logits_to_keep",
}


def _is_fused_step(input_ids, cache, kwargs) -> bool:
    """Whether this forward call is one the fused step computes exactly: one token per
    sequence, no gradients, a 2-d attention mask, a 4-d one of one query row (what
    ``generate`` passes with a static cache), or none, and a cache it can write."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return False
    if set(kwargs) - _HANDLED or torch.is_grad_enabled() or kwargs.get("use_cache") is False:
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and not _is_keep_mask(mask):
        return False
    return cache_problem(cache, input_ids.shape[0]) is None


def _is_keep_mask(mask: object) -> bool:
    """A 2-d mask (batch, positions) of 0/1, or a 4-d (batch, 1, 1, positions) one, boolean
    (True: attend) or additive (0: attend)."""
    if not isinstance(mask, torch.Tensor):
        return False
    if mask.dim() == 2:
        return True
    return mask.dim() == 4 and mask.shape[1:3] == (1, 1)


def _keep_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The first ``length`` positions of an attention mask as uint8 (batch, length), or None
    where they are all attended to."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0, 0]
        mask = mask if mask.dtype == torch.bool else mask == 0
    mask = mask[:, :length]
    if bool(mask.all()):
        return None
    return mask.to(torch.uint8).contiguous()
