from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn

from sdsprune import SdspruneError, load_model
from sdsprune.models import block_linears, decoder_blocks, model_linears


def test_decoder_blocks_found_for_each_architecture(arch):
    model = tiny_model(arch)
    blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = block_linears(blocks[0])
    assert len(linears) >= 6  # attention projections and MLP
    assert all(isinstance(layer, nn.Linear) for layer in linears.values())
    # embeddings and lm_head are never among the prunable layers
    prunable = set(map(id, model_linears(model).values()))
    assert id(model.get_output_embeddings()) not in prunable


def test_load_model_from_folder(tiny_model_dir: Path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.path == tiny_model_dir
    assert next(loaded.model.parameters()).dtype == torch.float32
    half = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-alias", "unknown model"),
        ("./missing/folder", "unknown model"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(SdspruneError, match=message):
        load_model(spec)


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(SdspruneError, match="could not read"):
        load_model(str(bad))
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir()
    )


def test_corrupt_weights_in_folder(tiny_model_dir: Path):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SdspruneError, match="could not load the model"):
        load_model(str(tiny_model_dir))


def test_folder_without_config(tmp_path):
    with pytest.raises(SdspruneError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sdsprune import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(SdspruneError, match="Hugging Face hub"):
        load_model("nobody-here/not-a-model-xyz")
    hub.hub_reachable.cache_clear()


def test_cuda_request_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SdspruneError, match="CUDA is not available"):
        load_model("no-such-alias", device="cuda")
