"""Resolve a model spec (alias, folder, .gguf file or hub id) into a model and tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdsprune.data.assets import fetch_pinned_file
from sdsprune.errors import SdspruneError
from sdsprune.hub import offline_kwargs
from sdsprune.models.aliases import ALIASES
from sdsprune.ownership import atomic_output_dir
from sdsprune.utils import cache_dir, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# Loading a checkpoint whose weights do not match its config is refused unless this is "1".
ALLOW_MISMATCH_ENV = "SDSPRUNE_ALLOW_WEIGHT_MISMATCH"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    spec: str
    path: Path | None  # local Hugging Face folder it was loaded from, when there is one

    @property
    def name(self) -> str:
        return self.spec


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"
) -> LoadedModel:
    """Load ``spec`` in evaluation mode on ``device``.

    ``spec`` is a bundled alias (``smollm2-135m``, ``gemma3-270m``), a local Hugging Face
    folder, a ``.gguf`` file, or a hub id. GGUF sources are dequantized once into a cached
    safetensors checkpoint, because converting takes ~15 s while the cache reloads in ~1 s.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    folder = resolve_model_folder(spec)
    if folder is not None and _is_sparse_export(folder):
        from sdsprune.inference.loader import load  # it reads the compact format

        loaded = load(folder, device=dev, dtype=torch_dtype, decode="eager")
        return LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, spec=spec, path=folder)
    source = str(folder) if folder is not None else spec
    model = _from_pretrained(source, torch_dtype)
    tokenizer = load_tokenizer(source)
    model.eval()
    model.to(dev)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=folder)


def resolve_model_folder(spec: str) -> Path | None:
    """Return a local checkpoint folder for ``spec``, or None when it is a hub id."""
    if spec in ALIASES:
        return _cached_conversion(fetch_pinned_file(ALIASES[spec].gguf), key=spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        fingerprint = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        key = f"{path.stem}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
        return _cached_conversion(path, key=key)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SdspruneError(f"{path} is a folder but has no config.json (not a model folder)")
        return path
    if path.exists():
        raise SdspruneError(f"{path} is neither a model folder nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return None
    known = ", ".join(sorted(ALIASES))
    raise SdspruneError(f"unknown model '{spec}': not an alias ({known}), a path or a hub id")


def _cached_conversion(gguf: Path, key: str) -> Path:
    folder = cache_dir() / "models" / key
    if (folder / "config.json").exists():
        return folder
    log.info("converting %s into a safetensors checkpoint (once)", gguf.name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the gguf reader raises many types on corrupt input
        raise SdspruneError(f"could not read {gguf} as a GGUF model: {_short(exc)}") from exc
    # The weights are plain dequantized floats now; drop the quantizer so that
    # save_pretrained writes an ordinary checkpoint any transformers install can load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _is_sparse_export(folder: Path) -> bool:
    """A folder written by ``sdsprune export --format sparse`` (from_pretrained cannot read
    it: its weights file has another name on purpose)."""
    from sdsprune.export import is_sparse_checkpoint

    return is_sparse_checkpoint(folder)


def _from_pretrained(source: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, output_loading_info=True, **_hub_kwargs(source)
        )
    except Exception as exc:
        raise SdspruneError(_load_failure(source, exc)) from exc
    check_loading_info(source, info)
    return model


def check_loading_info(source: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its config (e.g. a config with more
    layers than the weights): transformers fills the gaps with random values and only logs
    it, so the model would be pruned and saved silently wrong."""
    if os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        return
    problems = []
    for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys")):
        names = sorted(info.get(key) or [])
        if names:
            problems.append(f"{len(names)} {kind} ({_listing(names)})")
    mismatched = sorted(str(entry[0]) for entry in info.get("mismatched_keys") or [])
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({_listing(mismatched)})")
    if problems:
        raise SdspruneError(
            f"the weights in {source} do not match its config: {'; '.join(problems)} "
            f"(set {ALLOW_MISMATCH_ENV}=1 to load it anyway: missing weights are then random)"
        )


def _listing(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (
        f", ... {len(names) - shown} more" if len(names) > shown else ""
    )


def load_tokenizer(source: str):
    """The tokenizer of a local folder or a hub id (from the cache when the hub is unreachable)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(source))
    except Exception as exc:
        raise SdspruneError(_load_failure(source, exc)) from exc


def _hub_kwargs(source: str) -> dict:
    return {} if Path(source).exists() else offline_kwargs()


def _load_failure(source: str, exc: Exception) -> str:
    if Path(source).exists():
        return f"could not load the model in {source}: {_short(exc)}"
    return (
        f"could not load '{source}' from the Hugging Face hub (offline, or no such repo?): "
        f"{_short(exc)}"
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
