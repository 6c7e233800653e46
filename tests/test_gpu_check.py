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


def run_gpu_check(env: dict, cwd, timeout: int) -> subprocess.CompletedProcess:
    """``bash scripts/gpu_check.sh`` in ``cwd`` with ``env``, its output captured."""
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.mark.skipif(
    shutil.which("nvidia-smi", path=NO_GPU_PATH) is not None, reason="this machine has nvidia-smi"
)
def test_the_shell_script_says_no_gpu_and_exits_cleanly_before_any_setup(tmp_path):
    result = run_gpu_check({**os.environ, "PATH": NO_GPU_PATH}, tmp_path, timeout=60)
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
    result = run_gpu_check(env, tmp_path, timeout=120)
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "no CUDA" in lines[0] and "SDSPRUNE_TORCH_INDEX=" in lines[0]
    assert "scripts/setup.sh" in lines[0]
    assert "passed" not in result.stdout  # no test run after the refusal


def _repo_with_a_recording_venv(tmp_path: Path, torch_state: str) -> tuple[Path, Path]:
    """A copy of scripts/setup.sh beside a ``.venv`` whose ``python`` records its arguments
    instead of installing anything; ``torch_state``: "cpu" (a CPU-only torch), "cuda" or
    "none" (no torch)."""
    repo, log = tmp_path / "repo", tmp_path / "python.log"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    has_torch = 1 if torch_state == "none" else 0
    has_cuda = 0 if torch_state == "cuda" else 1
    (bin_dir / "python").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = "-c" ]; then\n'
        '  case "$2" in\n'
        f"    *torch.version.cuda*) exit {has_cuda};;\n"
        '    *"import sdsprune, torch"*) echo "sdsprune ready"; exit 0;;\n'
        f'    *"import torch"*) exit {has_torch};;\n'
        "  esac\n"
        "fi\n"
    )
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return repo, log


def _setup(repo: Path, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SDSPRUNE_")}, **env},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in (repo.parent / "python.log").read_text().splitlines() if "pip" in line]


INDEX = "https://download.pytorch.org/whl/cu128"


def test_setup_installs_a_cuda_torch_from_the_named_index_in_place_of_a_cpu_build(tmp_path):
    repo, _ = _repo_with_a_recording_venv(tmp_path, "cpu")
    pip = _setup(repo, SDSPRUNE_TORCH_INDEX=INDEX)
    assert "-m pip uninstall --quiet -y torch" in pip
    assert f"-m pip install --quiet --index-url {INDEX} torch==2.13.0" in pip
    assert pip.index(f"-m pip install --quiet --index-url {INDEX} torch==2.13.0") < next(
        i for i, line in enumerate(pip) if "-e .[dev]" in line
    )


def test_setup_keeps_a_cuda_torch_and_without_an_index_behaves_as_before(tmp_path):
    repo, _ = _repo_with_a_recording_venv(tmp_path, "cuda")
    assert not [line for line in _setup(repo, SDSPRUNE_TORCH_INDEX=INDEX) if "torch" in line]
    repo, _ = _repo_with_a_recording_venv(tmp_path / "cpu", "cpu")
    assert not [line for line in _setup(repo) if "torch" in line]  # CPU torch kept, unasked
    repo, _ = _repo_with_a_recording_venv(tmp_path / "none", "none")
    assert "-m pip install --quiet torch==2.13.0" in _setup(repo)
