"""Read and write checkpoint folders in the dense and the compact sparse format.

The sparse format is an ordinary Hugging Face folder (config, tokenizer, generation config
copied unchanged) whose weights live in ``sparse_model.safetensors`` plus a small JSON
manifest. The weights file has a different name on purpose: ``from_pretrained`` on a sparse
folder then fails with "no model.safetensors" instead of silently loading random weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdsprune.errors import SdspruneError
from sdsprune.export.packing import Encoded, decode_weight, encode_weight
from sdsprune.ownership import atomic_output_dir, check_output_folder
from sdsprune.utils import DTYPES

log = logging.getLogger(__name__)

FORMAT_NAME = "sdsprune-sparse"
FORMAT_VERSION = 1
MANIFEST = "sparse_manifest.json"
SPARSE_WEIGHTS = "sparse_model.safetensors"
DENSE_WEIGHTS = "model.safetensors"
EXPORT_FORMATS = ("sparse", "dense")
EXPORT_DTYPES = ("keep", "float16", "bfloat16", "float32")
PART_SEPARATOR = "::"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")


def is_sparse_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).exists()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a sparse folder, checked for a format this code understands."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdspruneError(f"cannot read the sparse manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise SdspruneError(
            f"{path} is format {manifest.get('format')!r} v{manifest.get('version')}, "
            f"this sdsprune reads {FORMAT_NAME} v{FORMAT_VERSION} (upgrade sdsprune)"
        )
    _check_plain_file_name(manifest.get("weights_file", SPARSE_WEIGHTS), path)
    return manifest


def _check_plain_file_name(name: object, manifest: Path) -> None:
    """The weights file must be a file inside the checkpoint's own folder: a manifest that
    points elsewhere (an absolute path, ``..``) would make readers load foreign files."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
    if not plain or "/" in name or "\\" in name:
        raise SdspruneError(
            f"{manifest} names weights_file {name!r}; it must be a plain file name inside "
            "the checkpoint folder (the checkpoint is corrupt or was tampered with)"
        )


def check_model_folder(folder: str | Path) -> Path:
    """Fail with an actionable message unless ``folder`` is a local checkpoint folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SdspruneError(f"{path} is not a folder (expected a saved model folder)")
    if not (path / "config.json").exists():
        raise SdspruneError(f"{path} has no config.json: not a model folder")
    return path


def load_state_dict(
    folder: str | Path, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a dense or sparse checkpoint folder, as dense tensors.

    ``dtype`` converts floating-point tensors; None keeps the stored dtypes exactly.
    """
    path = check_model_folder(folder)
    try:
        tensors = _read_sparse(path) if is_sparse_checkpoint(path) else _read_dense(path)
    except (SafetensorError, OSError, ValueError) as exc:  # a damaged or truncated file
        raise SdspruneError(f"cannot read the weights in {path}: {exc} (corrupt file?)") from exc
    if dtype is not None:
        tensors = {name: _convert(t, dtype) for name, t in tensors.items()}
    return tensors


def _read_dense(folder: Path) -> dict[str, torch.Tensor]:
    files = _dense_weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = handle.get_tensor(name)
    return tensors


def _dense_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / DENSE_WEIGHTS
    if single.exists():
        return [single]
    if any(folder.glob("*.bin")):
        raise SdspruneError(
            f"{folder} holds PyTorch .bin weights; re-save it with save_pretrained() "
            "(safetensors) before exporting"
        )
    raise SdspruneError(f"{folder} has no model.safetensors: not a saved model folder")


def _read_sparse(folder: Path) -> dict[str, torch.Tensor]:
    manifest = read_manifest(folder)
    file = folder / manifest.get("weights_file", SPARSE_WEIGHTS)
    if not file.exists():
        raise SdspruneError(f"{file} is missing: the sparse checkpoint is incomplete")
    encoded = manifest["tensors"]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            name, sep, suffix = key.partition(PART_SEPARATOR)
            if sep and name in encoded:
                parts.setdefault(name, {})[suffix] = handle.get_tensor(key)
            else:
                tensors[key] = handle.get_tensor(key)
    for name, info in encoded.items():
        if name not in parts:
            raise SdspruneError(f"{file} lacks the parts of {name}: the checkpoint is corrupt")
        tensors[name] = decode_weight(info["encoding"], parts[name], tuple(info["shape"]), info)
    return tensors


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def prunable_weight_names(folder: Path) -> set[str]:
    """State-dict names of every ``nn.Linear`` weight inside the decoder blocks.

    The model is built on the meta device from its config alone, so this costs no memory
    and works whatever produced the zeros.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdsprune.models import model_linears

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise SdspruneError(
            f"cannot build the model described by {folder}/config.json: {exc}"
        ) from exc
    linears = {id(layer) for layer in model_linears(model).values()}
    return {f"{name}.weight" for name, mod in model.named_modules() if id(mod) in linears}


def _copy_side_files(source: Path, target: Path) -> None:
    """Config, tokenizer, generation config, chat template: everything but the weights."""
    for item in source.iterdir():
        if item.is_file() and item.name != MANIFEST and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, target / item.name)


def _set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _resolve_export_dtype(dtype: str) -> torch.dtype | None:
    if dtype == "keep":
        return None
    if dtype not in DTYPES:
        raise SdspruneError(
            f"unknown export dtype '{dtype}' (choose from {', '.join(EXPORT_DTYPES)})"
        )
    return DTYPES[dtype]


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    format: str = "sparse",
    dtype: str = "keep",
    overwrite: bool = False,
) -> dict:
    """Write ``source`` (a dense or sparse folder) to ``out`` in ``format``; return a size report.

    ``sparse`` stores each pruned decoder-block linear weight in its smallest encoding (see
    :mod:`sdsprune.export.packing`) and every other tensor as is; ``dense`` writes a plain
    ``model.safetensors`` that ``from_pretrained`` loads. ``dtype`` (keep, float16, bfloat16,
    float32) converts floating-point tensors first, so the zeros are detected after rounding.
    """
    if format not in EXPORT_FORMATS:
        raise SdspruneError(
            f"unknown export format '{format}' (choose from {', '.join(EXPORT_FORMATS)})"
        )
    folder = check_model_folder(source)
    target_dtype = _resolve_export_dtype(dtype)
    target = check_output_folder(out, overwrite=overwrite, protected={"the source model": folder})
    tensors = load_state_dict(folder, target_dtype)
    prunable = prunable_weight_names(folder) & tensors.keys()
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        _copy_side_files(folder, tmp)
        if target_dtype is not None:
            _set_config_dtype(tmp, target_dtype)
        if format == "dense":
            save_file(tensors, str(tmp / DENSE_WEIGHTS), metadata={"format": "pt"})
            report = _dense_report(tensors, prunable)
        else:
            report = _write_sparse(tensors, prunable, tmp, dtype)
        report["weights_file_bytes"] = sum(
            f.stat().st_size for f in tmp.iterdir() if f.name.endswith(".safetensors")
        )
    report.update(
        source=str(folder),
        out=str(out),
        format=format,
        dtype=dtype if target_dtype is None else str(target_dtype).removeprefix("torch."),
        source_weights_file_bytes=sum(f.stat().st_size for f in _weight_files(folder)),
    )
    report["file_ratio_to_source"] = round(
        report["weights_file_bytes"] / max(report["source_weights_file_bytes"], 1), 4
    )
    return report


def _weight_files(folder: Path) -> list[Path]:
    if is_sparse_checkpoint(folder):
        return [folder / read_manifest(folder).get("weights_file", SPARSE_WEIGHTS)]
    return _dense_weight_files(folder)


def _write_sparse(
    tensors: dict[str, torch.Tensor], prunable: set[str], tmp: Path, dtype: str
) -> dict:
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    encodings: dict[str, int] = {}
    pruned_dense = pruned_sparse = 0
    for name, tensor in tensors.items():
        encoded = encode_weight(tensor) if name in prunable else None
        if encoded is None or encoded.encoding == "dense":
            stored[name] = tensor.contiguous()
            continue
        entries[name] = _manifest_entry(tensor, encoded)
        stored.update({f"{name}{PART_SEPARATOR}{k}": v for k, v in encoded.parts.items()})
        pruned_dense += _nbytes(tensor)
        pruned_sparse += encoded.nbytes
        pattern = entries[name]["pattern"]
        encodings[pattern] = encodings.get(pattern, 0) + 1
    save_file(stored, str(tmp / SPARSE_WEIGHTS), metadata={"format": FORMAT_NAME})
    total_dense = sum(_nbytes(t) for t in tensors.values())
    total_sparse = sum(_nbytes(t) for t in stored.values())
    sizes = {
        "pruned_tensors": len(entries),
        "prunable_tensors": len(prunable),
        "patterns": encodings,
        "pruned_dense_bytes": pruned_dense,
        "pruned_sparse_bytes": pruned_sparse,
        "pruned_ratio": round(pruned_sparse / pruned_dense, 4) if pruned_dense else None,
        "total_dense_bytes": total_dense,
        "total_sparse_bytes": total_sparse,
        "total_ratio": round(total_sparse / total_dense, 4) if total_dense else None,
    }
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights_file": SPARSE_WEIGHTS,
        "part_separator": PART_SEPARATOR,
        "export_dtype": dtype,
        "encodings": {
            "bitmask": "parts 'values' (non-zeros, row-major) and 'mask' (uint8, 1 bit per "
            "position, row-major, least significant bit first)",
            "nm": "parts 'values' (out, in*n/m) and 'indices' (uint8: for every group of m "
            "inputs, n ascending in-group positions of index_bits bits each, LSB first)",
            "negzero": "optional part: bitmask of -0.0 entries, for bit-identical round trips",
        },
        "sizes": sizes,
        "tensors": entries,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return dict(sizes)


def _manifest_entry(tensor: torch.Tensor, encoded: Encoded) -> dict:
    entry = {
        "encoding": encoded.encoding,
        "shape": list(tensor.shape),
        "dtype": _dtype_name(tensor),
        **encoded.meta,
        "negzero": "negzero" in encoded.parts,
    }
    if encoded.encoding == "nm":
        entry["pattern"] = f"{encoded.meta['n']}:{encoded.meta['m']}"
    else:
        entry["pattern"] = "unstructured"
    entry["sparsity"] = round(1 - encoded.meta["nnz"] / max(tensor.numel(), 1), 4)
    return entry


def _dense_report(tensors: dict[str, torch.Tensor], prunable: set[str]) -> dict:
    total = sum(_nbytes(t) for t in tensors.values())
    return {"prunable_tensors": len(prunable), "total_dense_bytes": total}
