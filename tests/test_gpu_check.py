"""scripts/gpu_check.sh: prepared for a GPU machine, clean and clear on one without."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_PATH = "/usr/bin:/bin"


@pytest.mark.skipif(
    shutil.which("nvidia-smi", path=NO_GPU_PATH) is not None, reason="this machine has nvidia-smi"
)
def test_the_shell_script_says_no_gpu_and_exits_cleanly_before_any_setup(tmp_path):
    env = {**os.environ, "PATH": NO_GPU_PATH}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU on this machine" in result.stdout
    assert "sdsprune ready" not in result.stdout  # setup.sh never ran


@pytest.mark.skipif(
    torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
    reason="this machine has a GPU (torch without CUDA on it is a failed check)",
)
def test_the_python_check_says_no_cuda_and_exits_cleanly():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU visible to torch" in result.stdout


def _fake_nvidia_smi(folder: Path) -> Path:
    """An ``nvidia-smi`` that lists one GPU, as on a GPU machine."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)'\n")
    tool.chmod(0o755)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use a CUDA GPU")
def test_a_visible_gpu_with_a_torch_without_cuda_fails_with_one_line_saying_how_to_fix(tmp_path):
    """nvidia-smi sees a GPU but torch cannot use it: the check must fail, not pass as
    "nothing to check", and say in one line how to install a CUDA build of torch."""
    fake = _fake_nvidia_smi(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SDSPRUNE_SKIP_SETUP": "1",  # the .venv is ready: no reinstall
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "no CUDA" in lines[0] and "SDSPRUNE_TORCH_INDEX=" in lines[0]
    assert "scripts/setup.sh" in lines[0]
    assert "passed" not in result.stdout  # no test run after the refusal
