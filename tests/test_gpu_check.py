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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
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
