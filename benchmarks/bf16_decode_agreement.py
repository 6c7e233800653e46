"""How far bfloat16 decoding is from float32, through transformers' forward and the fused step.

For each checkpoint: the float32 model (dense backend, eager) decodes 16 greedy tokens after
a 32-token prompt; the bfloat16 model (``auto``) is fed the same tokens twice, once through
its own forward (transformers' bfloat16: every activation rounded to bfloat16) and once
through the fused step (float32 activations, bfloat16 weights and cache). Reported per path:
the largest logit difference from float32 over the steps and at how many steps its greedy
choice equals float32's. Writes ``OUT`` (JSON) and prints one line per checkpoint::

    python benchmarks/bf16_decode_agreement.py --checkpoint dense=<folder> \\
        --checkpoint 50%=<folder> --out benchmarks/results/cpu-decode-fused/bf16-agreement.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sparse_cpu import cpu_name  # this folder's script (python puts its folder on the path)

import sdsprune
from sdsprune.inference.decode import eager_step, fused_step, new_cache, prefill

PROMPT, STEPS = 32, 16


def agreement(folder: str) -> dict:
    reference = sdsprune.load(folder, backend="dense", dtype="float32", decode="eager").model
    model = sdsprune.load(folder, backend="auto", dtype="bfloat16", decode="eager").model
    ids = torch.randint(
        0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)
    )
    paths = {"float32": (reference, eager_step(reference), "eager")}
    paths |= {
        "bf16 forward": (model, eager_step(model), "eager"),
        "bf16 fused": (model, fused_step(model), "fused"),
    }
    with torch.inference_mode():
        caches = {name: new_cache(m, mode, PROMPT + STEPS) for name, (m, _, mode) in paths.items()}
        token = prefill(reference, ids, caches["float32"])
        for name in ("bf16 forward", "bf16 fused"):
            prefill(model, ids, caches[name])
        worst = {name: 0.0 for name in paths if name != "float32"}
        same = dict.fromkeys(worst, 0)
        for _ in range(STEPS):
            logits, choice = paths["float32"][1](token, caches["float32"])
            for name in worst:
                other, other_choice = paths[name][1](token, caches[name])
                worst[name] = max(worst[name], (other.float() - logits).abs().max().item())
                same[name] += int(torch.equal(other_choice, choice))
            token = choice
    return {
        name: {
            "max_abs_logit_diff_vs_float32": round(worst[name], 4),
            "same_greedy_steps": same[name],
        }
        for name in worst
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="LABEL=FOLDER")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "steps": STEPS,
        "checkpoints": {},
    }
    for spec in args.checkpoint:
        label, folder = spec.split("=", 1)
        results["checkpoints"][label] = agreement(folder)
        print(label, results["checkpoints"][label], flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
