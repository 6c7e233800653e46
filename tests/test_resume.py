"""Interrupted runs: a run killed after a block continues with --resume to the same model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdsprune import SdspruneError
from sdsprune.options import Calibration, RunOptions
from sdsprune.ownership import STATE_MARKER
from sdsprune.prune import prune

CORPUS = "The quick brown fox jumps over the lazy dog while pruning sparse models. " * 40


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdsprune", "prune", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS)
    return path


def common(model: Path, corpus: Path, method: str = "sparsegpt") -> list[str]:
    return [str(model), "--method", method, "--calib", str(corpus), "--nsamples", "8",
            "--seqlen", "32", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize("low_memory", [False, True])
def test_killed_run_resumes_to_the_uninterrupted_result(
    tiny_model_dir, corpus, tmp_path, low_memory
):
    extra = ["--low-memory"] if low_memory else []
    args = common(tiny_model_dir, corpus) + extra
    calibration = Calibration(corpus=str(corpus), nsamples=8, seqlen=32)
    full = RunOptions(device="cpu", out=tmp_path / "full", progress=False)
    prune(str(tiny_model_dir), "sparsegpt", calibration=calibration, run=full)
    state = tmp_path / "state"
    marker = tmp_path / "fault"
    killed = cli(
        *args, "--out", str(tmp_path / "resumed"), "--state-dir", str(state),
        env={"SDSPRUNE_FAULT": "kill@0", "SDSPRUNE_FAULT_FILE": str(marker)},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr  # SIGKILL: nothing could clean up
    assert marker.exists() and (state / "manifest.json").exists()
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(SdspruneError, match="--resume"):  # refuses to silently start over
        again = RunOptions(device="cpu", state_dir=state, progress=False)
        prune(str(tiny_model_dir), "sparsegpt", calibration=calibration, run=again)
    resumed = cli(*args, "--out", str(tmp_path / "resumed"), "--state-dir", str(state), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not state.exists()  # a finished run leaves no state behind


@pytest.mark.parametrize("redense", ["0", "1"])
def test_killed_block_refit_run_resumes_to_the_uninterrupted_result(
    tiny_model_dir, corpus, tmp_path, redense
):
    """The block re-fit (Adam, seeded mini-batches; with a block re-dense, masks chosen
    again) continues after a kill exactly."""
    refit = ["--sparsity", "2:4", "--block-epochs", "2", "--block-batch", "3"]
    refit += ["--block-redense", redense]
    assert_killed_run_resumes(common(tiny_model_dir, corpus, "sds") + refit, tmp_path, "kill@0")


def assert_killed_run_resumes(args: list[str], tmp_path: Path, fault: str) -> None:
    """``args`` run whole, then killed at ``fault`` and resumed: the same weights."""
    full = cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    state = tmp_path / "state"
    killed = cli(
        *args, "--out", str(tmp_path / "resumed"), "--state-dir", str(state),
        env={"SDSPRUNE_FAULT": fault, "SDSPRUNE_FAULT_FILE": str(tmp_path / "fault")},
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    resumed = cli(*args, "--out", str(tmp_path / "resumed"), "--state-dir", str(state), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_run_killed_before_its_distillation_resumes_to_the_uninterrupted_result(
    tiny_model_dir, corpus, tmp_path
):
    """Killed after the last block: the saved state is the distillation's start, and the
    resumed run distils from it to the same model (a kill during the stage resumes the same
    way: the state holds every block, the stage runs again from its seeded start)."""
    distill = ["--sparsity", "2:4", "--block-epochs", "0", "--distill-epochs", "1"]
    assert_killed_run_resumes(common(tiny_model_dir, corpus, "sds") + distill, tmp_path, "kill@1")


def test_resume_refuses_state_of_another_run(tiny_model_dir, tmp_path):
    from conftest import byte_tokenizer, tiny_model

    from sdsprune.models import LoadedModel

    state = tmp_path / "state"
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))

    def run(method, resume):
        loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny", None)
        options = RunOptions(device="cpu", progress=False, state_dir=state, resume=resume)
        return prune(loaded, method, calibration=windows, run=options)

    with pytest.raises(SdspruneError, match="nothing to resume"):
        run("wanda", resume=True)
    os.environ["SDSPRUNE_FAULT"] = "pause@99"  # never triggers; just exercise the parser
    try:
        run("wanda", resume=False)
    finally:
        del os.environ["SDSPRUNE_FAULT"]
    assert not state.exists()
    # leave a manifest behind by hand, as a killed run would, then resume with other options
    state.mkdir()
    (state / STATE_MARKER).write_text('{"created_folder": true}')
    (state / "manifest.json").write_text(
        '{"fingerprint": "x", "pass": 0, "done": 0, "records": {}}'
    )
    with pytest.raises(SdspruneError, match="other options"):
        run("sparsegpt", resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "manifest.json").write_text("[]"), "damaged run state"),
        (lambda s: (s / "manifest.json").write_text('{"done": 0}'), "damaged run state"),
        (
            lambda s: (s / "manifest.json").write_text(
                (s / "manifest.json").read_text().replace('"done": 1', '"done": 99')
            ),
            "100 blocks are done",
        ),
        (lambda s: _truncate(s / "blocks" / "block-00001.safetensors"), "unreadable run state"),
        (lambda s: (s / "blocks" / "block-00000.safetensors").unlink(), "unreadable run state"),
        (lambda s: _truncate(next(s.glob("stream-*block00001*"))), "unreadable run state"),
        (lambda s: next(s.glob("stream-*block00001*")).unlink(), "unreadable run state"),
    ],
)
def test_damaged_state_is_one_clear_error(tmp_path, monkeypatch, damage, message):
    """Whatever part of a kept state is damaged, resuming says so (the CLI prints it as one
    error line) instead of failing deep inside torch or safetensors."""
    from conftest import byte_tokenizer, tiny_model

    from sdsprune.engine import runs
    from sdsprune.models import LoadedModel

    monkeypatch.setattr(runs, "remove_state", lambda folder: None)  # keep it, as a kill would
    state = tmp_path / "state"
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))

    def run(resume: bool):
        loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny", None)
        options = RunOptions(device="cpu", progress=False, state_dir=state, resume=resume)
        return prune(loaded, "wanda", calibration=windows, run=options)

    run(resume=False)
    damage(state)
    with pytest.raises(SdspruneError, match=message):
        run(resume=True)
