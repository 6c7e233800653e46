"""``sdsprune.load``: any checkpoint (dense or sparse) plus an inference backend."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch
from torch import nn

from sdsprune.errors import SdspruneError
from sdsprune.export import is_sparse_checkpoint, load_state_dict
from sdsprune.inference.backends import apply_backend, model_device
from sdsprune.inference.decode import compile_generation
from sdsprune.inference.fused import enable_fused_decode, fused_problem
from sdsprune.inference.native import has_compiler
from sdsprune.models import LoadedModel, load_model
from sdsprune.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "fused", "compiled", "eager")


def load(
    spec: str | Path,
    *,
    backend: str = "dense",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    decode: str = "auto",
    **backend_options,
) -> LoadedModel:
    """Load a model folder (dense, or written by ``sdsprune export --format sparse``).

    ``dtype`` None keeps a sparse checkpoint's stored dtype, so its weights come back
    bit-identical; dense specs (aliases, folders, hub ids) go through ``load_model`` with
    its ``auto`` dtype. ``backend`` (dense, auto, csr, bsr, semi-structured) then swaps the
    pruned layers for sparse kernels; see :func:`sdsprune.inference.apply_backend`. The
    choice per layer is in ``sdsprune.inference.backend_report(loaded.model)``. Where the
    model will decode through the fused step, ``auto`` gives every pruned layer the bitmask
    kernel without timing (the packed form reads the fewest bytes, and bytes set the fused
    step's speed); elsewhere it races the kernels per layer.

    ``decode`` sets how ``loaded.model.generate()`` runs its one-token steps:

    - ``"fused"``: a static KV cache and each step as one C++ loop over the blocks, through
      the layers' own kernels (:mod:`~sdsprune.inference.fused`; Llama, Mistral and Qwen2
      models on the CPU): the fastest path, nothing to compile. Where it cannot serve the
      model, a warning says why and ``"compiled"`` is used instead;
    - ``"compiled"``: a static KV cache and a ``torch.compile``d step (any model; see
      :func:`~sdsprune.inference.decode.compile_generation`), at the price of a compile on
      the first call;
    - ``"eager"``: generation as transformers sets it up;
    - ``"auto"`` (the default): ``"fused"`` where it can serve the model, else ``"eager"``.
    """
    if decode not in DECODE_CHOICES:
        raise SdspruneError(f"unknown decode '{decode}' (choose from {', '.join(DECODE_CHOICES)})")
    path = Path(spec).expanduser()
    if path.is_dir() and is_sparse_checkpoint(path):
        dev = resolve_device(device)
        loaded = _load_sparse(path, dev, None if dtype is None else resolve_dtype(dtype, dev))
    else:
        loaded = load_model(str(spec), device=device, dtype=dtype or "auto")
    fused = decode in ("auto", "fused") and fused_decode_problem(loaded.model) is None
    apply_backend(loaded.model, backend, fused_decode=fused, **backend_options)
    _set_up_decode(loaded.model, decode)
    return loaded


def fused_decode_problem(model: nn.Module) -> str | None:
    """Why the fused step cannot serve ``model`` (None when it can): what ``decode="auto"``
    asks before it chooses the fused step."""
    return fused_problem(model) if model_device(model).type == "cpu" else "not a CPU model"


def _set_up_decode(model: nn.Module, decode: str) -> None:
    """Install the decode path ``decode`` asks for (see :func:`load`), falling back as it says."""
    if decode in ("auto", "fused"):
        problem = fused_decode_problem(model)
        if problem is None:
            enable_fused_decode(model)
            return
        if decode == "auto":
            log.debug("fused decode not used: %s", problem)
            return
        log.warning("decode='fused' cannot serve this model (%s); compiling instead", problem)
    if decode in ("fused", "compiled"):
        _compile_if_possible(model)


def _compile_if_possible(model: nn.Module) -> None:
    """Set up compiled generation, or say why generation stays eager: inductor builds C++
    for a CPU model, and without a compiler the first ``generate`` would fail instead."""
    if model_device(model).type == "cpu" and not has_compiler():
        log.warning("decode='compiled' needs a C++ compiler for the CPU; generation stays eager")
        return
    compile_generation(model)


def _load_sparse(folder: Path, device: torch.device, dtype: torch.dtype | None) -> LoadedModel:
    from transformers import AutoConfig

    tensors = load_state_dict(folder, dtype)
    model_dtype = dtype or _dominant_dtype(tensors)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise SdspruneError(f"cannot read {folder}/config.json: {exc}") from exc
    model = _empty_model(config, model_dtype)
    _fill(model, tensors, folder)
    model.eval().to(device)
    return LoadedModel(model=model, tokenizer=_tokenizer(folder), spec=str(folder), path=folder)


def _dominant_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most parameters (what the model is built in)."""
    sizes: collections.Counter = collections.Counter()
    for tensor in tensors.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] += tensor.numel()
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def _empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The architecture without random initialisation (every weight is overwritten)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    try:
        with no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:
        raise SdspruneError(f"cannot build the model from its config: {exc}") from exc


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy the checkpoint in; only weights tied to a loaded one may be absent."""
    state = model.state_dict()
    reshaped = [n for n, t in tensors.items() if n in state and state[n].shape != t.shape]
    if reshaped:  # load_state_dict would raise a RuntimeError listing every tensor
        raise SdspruneError(
            f"{folder} does not match its config ({len(reshaped)} of another shape: "
            f"{', '.join(reshaped[:3])})"
        )
    result = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in tensors if name in state}
    missing = [name for name in result.missing_keys if state[name].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        problems = missing[:3] + result.unexpected_keys[:3]
        raise SdspruneError(
            f"{folder} does not match its config (missing or unexpected: {', '.join(problems)})"
        )


def _tokenizer(folder: Path):
    """The tokenizer when the folder has one; benchmarks and kernels do not need it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a folder without tokenizer files is still a usable model
        log.warning("no tokenizer loaded from %s: %s", folder, str(exc).splitlines()[0][:200])
        return None
