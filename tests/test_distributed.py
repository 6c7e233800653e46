"""Two processes through torch.distributed (gloo on CPU) give the one-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_worker import CONFIGS, run
from safetensors.torch import load_file

from sdsprune.options import Calibration, RunOptions
from sdsprune.prune import prune

HERE = Path(__file__).parent
CORPUS = "The quick brown fox jumps over the lazy dog while pruning sparse models. " * 40


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``--standalone``: a local rendezvous on a free port, so parallel runs do not clash."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", *args]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


# Adam's normalised steps (block re-fit, on by default for SDS) turn last-bit differences of
# tiny gradients, summed in another order across ranks, into weight differences up to ~2e-5
# (weights ~0.08); how large depends on the CPU's kernels (1.2e-5 for kd on an AVX-512 host).
# The distillation's steps are Adam's too, on gradients that reach the tiny model's last k/v
# projections through attention and the vocabulary (near zero): up to ~1.1e-4 (weights ~0.08).
# The block re-dense adds Adam steps on every weight and SparseGPT's updates of the second
# pruning on top: up to ~1.5e-4 (weights ~0.08), masks equal.
ATOL = {"sds-block": 5e-5, "sds-block-redense": 3e-4, "sds-kd": 5e-5, "sds-distill": 3e-4}


def assert_same(single: dict, multi: dict, label: str) -> None:
    assert single.keys() == multi.keys()
    for name in single:
        a, b = single[name], multi[name]
        if a.is_floating_point() and a.dim() == 2:
            assert torch.equal(a == 0, b == 0), f"{label}: mask of {name} differs"
        atol = ATOL.get(label, 1e-5)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=f"{label}: {name}")


def test_two_processes_match_one_through_the_api(tmp_path):
    result = torchrun(str(HERE / "dist_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, kwargs in CONFIGS.items():
        single_state, single_layers = run(name, **kwargs)
        saved = torch.load(tmp_path / f"{name}.pt")
        assert_same(single_state, saved["state"], name)
        for layer, record in single_layers.items():  # reduced probes and statistics
            assert saved["layers"][layer]["rel_error"] == pytest.approx(
                record["rel_error"], rel=1e-3, abs=1e-6
            ), (name, layer)


def test_two_processes_through_the_cli_with_low_memory(tiny_model_dir, tmp_path):
    corpus = tmp_path / "calib.txt"
    corpus.write_text(CORPUS)
    calibration = Calibration(corpus=str(corpus), nsamples=8, seqlen=32)
    run_options = RunOptions(device="cpu", out=tmp_path / "one", progress=False)
    prune(str(tiny_model_dir), "sparsegpt", calibration=calibration, run=run_options)
    result = torchrun(
        "-m", "sdsprune", "prune", str(tiny_model_dir), "--method", "sparsegpt",
        "--calib", str(corpus), "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
        "--low-memory", "--out", str(tmp_path / "two"), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"config"') == 1  # only rank 0 reports
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = {}
    for path in (tmp_path / "two").glob("*.safetensors"):
        two.update(load_file(str(path)))
    assert_same(one, {k: two[k] for k in one}, "cli")
    assert not list(tmp_path.glob(".two*"))  # no scratch folders left behind


FAILURE = "SdspruneError: injected failure on rank 1 in block 2"  # dist_fail_worker.py's


def test_a_rank_that_fails_mid_block_ends_the_run_with_its_error(tmp_path):
    """Rank 1 raises while rank 0 waits for its share of block 2: both end within a minute,
    rank 0 with rank 1's error (not its own "connection closed"), and nothing is saved."""
    out = tmp_path / "pruned"
    start = time.monotonic()
    result = torchrun(str(HERE / "dist_fail_worker.py"), "raise", str(out))
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert f"rank 1 failed: {FAILURE}" in result.stderr, result.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.iterdir())


def spawn_ranks(*args: str, world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of ``dist_fail_worker.py`` joined as torchrun would join them,
    without torchrun (which stops the others when one exits): each one must end by itself."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    common.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "dist_fail_worker.py"), *args],
            env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def test_a_rank_waiting_on_a_failed_peer_that_stays_alive_ends_with_its_error(tmp_path):
    """Rank 1 fails but its process stays up, group and all (a teardown that hangs): no
    connection closes, so rank 0's collective would wait for torch's timeout (30 minutes);
    it must end within a minute with rank 1's error."""
    out = tmp_path / "pruned"
    ranks = spawn_ranks("linger", str(out))
    try:
        _, errors = ranks[0].communicate(timeout=60)
        assert ranks[1].poll() is None  # rank 0 did not wait for rank 1's process
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert ranks[0].returncode != 0
    assert f"rank 1 failed: {FAILURE}" in errors, errors[-3000:]
    assert not out.exists()


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from sdsprune import SdspruneError
    from sdsprune.engine.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() is None  # torch's own default
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(seconds=90)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(SdspruneError, match="positive number of seconds"):
        collective_timeout()
