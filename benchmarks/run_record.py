"""The JSON file a benchmark writes with --out: its results and what produced them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdsprune.runinfo import library_versions


def write_run_record(path: str, script: str, args: argparse.Namespace, **results) -> None:
    """``results`` after the command that reruns them (every option spelled out, defaults
    too, so a later change of default does not change what the file describes), torch's
    thread count and the library versions."""
    options = " ".join(
        f"--{key.replace('_', '-')} {value}"
        for key, value in vars(args).items()
        if value is not None
    )
    record = {
        "command": f"python benchmarks/{Path(script).name} {options}",
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        **results,
    }
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
