"""Bad input and faults, end to end through the CLI: one clear line, exit 2 (130 for
Ctrl-C), and nothing half-written where the output should appear."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdsprune.cli import main

CORPUS = "The quick brown fox jumps over the lazy dog while pruning sparse models. " * 40


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS)
    return path


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The CLI entry point in-process (fast: no interpreter start per case)."""
    monkeypatch.setattr(sys, "argv", ["sdsprune", "prune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def base_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return [str(model), "--method", "wanda", "--calib", str(corpus), "--nsamples", "4",
            "--seqlen", "16", "--device", "cpu", "--out", str(out)]  # fmt: skip


def edited_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny checkpoint with some tensors changed."""
    folder = tmp_path / "edited"
    shutil.copytree(model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def assert_clean_failure(code: int, err: str, message: str, out: Path, expected: int = 2):
    assert code == expected, err
    assert message in err, err
    assert "Traceback" not in err
    assert err.count("error:") == 1, err  # one line (progress bars may precede it)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "scratch left behind"


def nan_in_linear(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


def nan_in_norm(tensors):  # not a linear layer: only the activations reveal it
    tensors["model.layers.0.post_attention_layernorm.weight"][:] = float("nan")


@pytest.mark.parametrize(
    "change, extra, message",
    [
        ("unknown-model", [], "unknown model"),
        ("corrupt", [], "could not load the model"),
        ("corrupt", ["--low-memory"], "corrupt checkpoint"),
        ("none", ["--sparsity", "1.5"], "strictly between 0 and 1"),
        ("none", ["--sparsity", "0"], "strictly between 0 and 1"),
        ("none", ["--sparsity", "1e-9"], "less than one weight per row"),
        ("none", ["--sparsity", "4:4"], "0 < N < M"),
        ("none", ["--sparsity", "2:7"], "divisible by 7"),
        ("none", ["--nsamples", "64", "--seqlen", "128"], "fewer than nsamples x seqlen"),
        ("nan-weight", [], "NaN/Inf weights"),
        ("nan-weight", ["--low-memory"], "NaN/Inf weights"),
        ("nan-activation", [], "NaN/Inf activations after decoder block 0"),
        ("nan-activation", ["--low-memory"], "post_attention_layernorm.weight has NaN/Inf"),
        ("none", ["--resume"], "--resume needs the --state-dir"),
        ("none", ["--method", "sds", "--lambda1", "nan"], "--lambda1 must be a finite number"),
        ("none", ["--method", "sds", "--mu", "inf"], "--mu must be a finite number"),
        ("none", ["--base", "wanda"], "--base applies to --method sds only"),
        ("none", ["--method", "sds", "--figure-layer", "99.mlp.up"], "--figure-layer '99.mlp.up'"),
        ("none", ["--low-memory", "--eval", "wiki"], "cannot evaluate in the same run"),
    ],
)
def test_bad_input(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path, change, extra, message):
    model = tiny_model_dir
    if change == "unknown-model":
        model = Path("no-such-model-alias")
    elif change == "corrupt":
        model = tmp_path / "corrupt"
        shutil.copytree(tiny_model_dir, model)
        (model / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    elif change == "nan-weight":
        model = edited_copy(tiny_model_dir, tmp_path, nan_in_linear)
    elif change == "nan-activation":
        model = edited_copy(tiny_model_dir, tmp_path, nan_in_norm)
    out = tmp_path / "out"
    code, err = run_main(monkeypatch, capsys, *base_args(model, corpus, out), *extra)
    assert_clean_failure(code, err, message, out)


def test_existing_output_folder_is_not_touched(
    monkeypatch, capsys, tiny_model_dir, corpus, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(monkeypatch, capsys, *base_args(tiny_model_dir, corpus, out))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("low_memory", [False, True])
def test_disk_full_while_saving(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path, low_memory):
    out = tmp_path / "out"
    real_write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "sdsprune_report.json":  # the last file written into the output
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    extra = ["--low-memory"] if low_memory else []
    code, err = run_main(monkeypatch, capsys, *base_args(tiny_model_dir, corpus, out), *extra)
    assert_clean_failure(code, err, "No space left on device", out)


def test_disk_full_while_writing_a_block(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    import sdsprune.engine.checkpoint as checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "out"
    code, err = run_main(
        monkeypatch, capsys, *base_args(tiny_model_dir, corpus, out), "--low-memory"
    )
    assert_clean_failure(code, err, "No space left on device", out)


def test_permission_denied(monkeypatch, capsys, tiny_model_dir, corpus, tmp_path):
    """Tests run as root, for whom chmod does not deny anything: fake the refusal."""
    out = tmp_path / "readonly" / "out"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code, err = run_main(monkeypatch, capsys, *base_args(tiny_model_dir, corpus, out))
    assert_clean_failure(code, err, "Permission denied", out)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "low_memory, stop, code",
    [
        (False, signal.SIGINT, 130),
        (True, signal.SIGINT, 130),
        (False, signal.SIGTERM, 143),  # a scheduler's stop cleans up like Ctrl-C
        (True, signal.SIGTERM, 143),
    ],
)
def test_ctrl_c_or_sigterm_exits_and_writes_nothing(
    tiny_model_dir, corpus, tmp_path, low_memory, stop, code
):
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    args = base_args(tiny_model_dir, corpus, out) + (["--low-memory"] if low_memory else [])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "SDSPRUNE_FAULT": "pause@0",
           "SDSPRUNE_FAULT_FILE": str(marker)}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "sdsprune", "prune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A shell starts background jobs with SIGINT ignored and children inherit that (then
        # Python installs no KeyboardInterrupt handler): give the child a terminal's default.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[1]
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*")), "scratch left behind"


def test_nan_weights_from_the_api_without_a_checkpoint():
    from conftest import byte_tokenizer, tiny_model

    from sdsprune import SdspruneError
    from sdsprune.models import LoadedModel
    from sdsprune.options import RunOptions
    from sdsprune.prune import prune

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    loaded = LoadedModel(model, byte_tokenizer(), "tiny", None)
    windows = torch.randint(0, 256, (4, 16))
    with pytest.raises(SdspruneError, match="NaN/Inf weights"):
        prune(loaded, "wanda", calibration=windows, run=RunOptions(device="cpu", progress=False))
