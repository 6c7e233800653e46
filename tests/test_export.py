"""Compact sparse export: encodings, bit-identical round trips, sizes, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS, byte_tokenizer, tiny_model

import sdsprune
from sdsprune.errors import SdspruneError
from sdsprune.export import (
    MANIFEST,
    decode_weight,
    encode_weight,
    export_checkpoint,
    load_state_dict,
    prunable_weight_names,
    read_manifest,
)
from sdsprune.export.packing import pack_bits, pack_ints, unpack_bits, unpack_ints
from sdsprune.models import model_linears

PATTERNS = ("unstructured", "2:4", "4:8", "1:4", "negzero")


def prune_weight(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """Zero ``weight`` by magnitude: 50% per row, or N of every M inputs kept."""
    w = weight.detach().clone()
    if pattern in ("unstructured", "negzero"):
        drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
        mask = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
        # "negzero": the w * mask style of pruning leaves -0.0 where w was negative.
        return w * mask if pattern == "negzero" else w.masked_fill(~mask, 0.0)
    n, m = (int(x) for x in pattern.split(":"))
    groups = w.view(w.shape[0], -1, m)
    groups.scatter_(2, groups.abs().argsort(dim=2)[:, :, : m - n], 0.0)
    return w


def pruned_dir(tmp_path: Path, pattern: str, arch: str = "llama") -> Path:
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight.copy_(prune_weight(layer.weight, pattern))
    folder = tmp_path / f"{arch}-{pattern.replace(':', 'of')}"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def assert_same_state(expected: dict, actual: dict) -> None:
    for name, tensor in expected.items():
        assert name in actual, name
        assert same_bits(tensor, actual[name]), name


# --- packing -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_bits_round_trip(count):
    bits = torch.rand(count) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 7) // 8
    assert torch.equal(unpack_bits(packed, count), bits)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_ints_round_trip(width):
    values = torch.randint(0, 2**width, (101,))
    packed = pack_ints(values, width)
    assert packed.numel() == (101 * width + 7) // 8
    assert torch.equal(unpack_ints(packed, 101, width), values)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_round_trip_is_bit_identical(pattern, dtype):
    weight = prune_weight(torch.randn(48, 64), pattern).to(dtype)
    encoded = encode_weight(weight)
    expected = "bitmask" if pattern in ("unstructured", "negzero") else "nm"
    assert encoded.encoding == expected
    decoded = decode_weight(encoded.encoding, encoded.parts, tuple(weight.shape), encoded.meta)
    assert same_bits(decoded, weight)
    assert ("negzero" in encoded.parts) == (pattern == "negzero")


def test_nm_groups_with_missing_nonzeros_are_padded():
    weight = prune_weight(torch.randn(8, 16), "2:4")
    weight[0] = 0.0  # whole row of empty groups
    weight[1, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # one non-zero in a group
    encoded = encode_weight(weight)
    assert encoded.encoding == "nm" and encoded.meta["n"] == 2
    assert encoded.parts["values"].shape == (8, 8)
    decoded = decode_weight("nm", encoded.parts, (8, 16), encoded.meta)
    assert same_bits(decoded, weight)


def test_dense_and_loose_patterns_choose_the_smaller_encoding():
    weight = torch.randn(32, 64)
    assert encode_weight(weight).encoding == "dense"
    few = weight.clone()
    few[0, 0] = 0.0  # a stray zero is not worth a bitmask
    assert encode_weight(few).encoding == "dense"
    # 50% unstructured technically fits 7:8 or 8:8, but the bitmask is much smaller.
    assert encode_weight(prune_weight(weight, "unstructured")).encoding == "bitmask"


# --- checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_export_round_trips_bit_identically(pattern, tmp_path):
    source = pruned_dir(tmp_path, pattern)
    out = tmp_path / "sparse"
    report = export_checkpoint(source, out, format="sparse")
    assert report["pruned_tensors"] == report["prunable_tensors"] == 14
    assert not (out / "model.safetensors").exists()  # from_pretrained must not half-load it
    for name in ("config.json", "tokenizer.json", MANIFEST):
        assert (out / name).exists()
    original = load_state_dict(source)
    assert_same_state(original, load_state_dict(out))
    loaded = sdsprune.load(out)
    assert_same_state(original, loaded.model.state_dict())
    assert loaded.tokenizer is not None


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "negzero"])
def test_dense_reexport_loads_with_from_pretrained(pattern, tmp_path):
    from transformers import AutoModelForCausalLM

    source = pruned_dir(tmp_path, pattern)
    export_checkpoint(source, tmp_path / "sparse", format="sparse")
    export_checkpoint(tmp_path / "sparse", tmp_path / "dense", format="dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert_same_state(load_state_dict(source), model.state_dict())
    reference = AutoModelForCausalLM.from_pretrained(source)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture_round_trips_at_2_4(arch, tmp_path):
    source = pruned_dir(tmp_path, "2:4", arch)
    report = export_checkpoint(source, tmp_path / "sparse", format="sparse")
    assert report["pruned_tensors"] == report["prunable_tensors"] > 0
    loaded = sdsprune.load(tmp_path / "sparse")
    assert_same_state(load_state_dict(source), loaded.model.state_dict())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dtype_export_equals_converted_weights(dtype, pattern, tmp_path):
    source = pruned_dir(tmp_path, pattern)
    out = tmp_path / "sparse"
    report = export_checkpoint(source, out, format="sparse", dtype=dtype)
    target = getattr(torch, dtype)
    expected = load_state_dict(source, target)
    loaded = sdsprune.load(out)
    assert next(loaded.model.parameters()).dtype == target
    assert_same_state(expected, loaded.model.state_dict())
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    # values at 2 bytes plus 1 bit (bitmask) or 2 bits per kept value (2:4) per 2 inputs
    assert report["pruned_ratio"] == pytest.approx(0.5625, abs=0.002)


def test_manifest_describes_patterns_and_sizes(tmp_path):
    out = tmp_path / "sparse"
    export_checkpoint(pruned_dir(tmp_path, "2:4"), out, format="sparse")
    manifest = read_manifest(out)
    assert manifest["sizes"]["patterns"] == {"2:4": 14}
    entry = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert entry["encoding"] == "nm" and entry["index_bits"] == 2 and entry["sparsity"] == 0.5
    assert "model.embed_tokens.weight" not in manifest["tensors"]


def test_unpruned_model_stays_dense_and_sparse_to_sparse_works(tmp_path, tiny_model_dir):
    report = export_checkpoint(tiny_model_dir, tmp_path / "a", format="sparse")
    assert report["pruned_tensors"] == 0
    assert_same_state(load_state_dict(tiny_model_dir), load_state_dict(tmp_path / "a"))
    source = pruned_dir(tmp_path, "2:4")
    export_checkpoint(source, tmp_path / "b", format="sparse")
    export_checkpoint(tmp_path / "b", tmp_path / "c", format="sparse", dtype="bfloat16")
    assert_same_state(load_state_dict(source, torch.bfloat16), load_state_dict(tmp_path / "c"))


def test_prunable_names_are_decoder_linears_only(tiny_model_dir):
    names = prunable_weight_names(tiny_model_dir)
    assert len(names) == 14
    assert all(name.startswith("model.layers.") and name.endswith(".weight") for name in names)


def test_export_errors_are_actionable(tmp_path, tiny_model_dir):
    with pytest.raises(SdspruneError, match="not a folder"):
        export_checkpoint(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdspruneError, match=r"no config\.json"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(SdspruneError, match="unknown export format"):
        export_checkpoint(tiny_model_dir, tmp_path / "o", format="onnx")
    with pytest.raises(SdspruneError, match="unknown export dtype"):
        export_checkpoint(tiny_model_dir, tmp_path / "o", dtype="int3")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SdspruneError, match="--overwrite"):
        export_checkpoint(tiny_model_dir, tmp_path / "taken")
    export_checkpoint(tiny_model_dir, tmp_path / "taken", overwrite=True)
    with pytest.raises(SdspruneError, match="is the source model"):
        export_checkpoint(tiny_model_dir, tiny_model_dir, overwrite=True)
    assert not list(tmp_path.glob(".*partial*"))


def test_bin_checkpoints_and_bad_manifests_are_refused(tmp_path, tiny_model_dir):
    binary = tmp_path / "bin"
    tiny_model("llama").save_pretrained(binary, safe_serialization=False)
    if (binary / "pytorch_model.bin").exists():  # transformers 5 may always write safetensors
        with pytest.raises(SdspruneError, match=r"\.bin"):
            export_checkpoint(binary, tmp_path / "o")
    out = tmp_path / "sparse"
    export_checkpoint(pruned_dir(tmp_path, "2:4"), out)
    (out / MANIFEST).write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(SdspruneError, match="upgrade sdsprune"):
        sdsprune.load(out)


def test_sharded_source_and_from_pretrained_refuses_a_sparse_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model_linears(model).values():
            layer.weight.copy_(prune_weight(layer.weight, "2:4"))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    out = tmp_path / "sparse"
    report = export_checkpoint(sharded, out, format="sparse")
    assert report["pruned_tensors"] == 14
    assert_same_state(load_state_dict(sharded), load_state_dict(out))
    with pytest.raises(OSError):  # no model.safetensors: a loud failure, not random weights
        AutoModelForCausalLM.from_pretrained(out)
