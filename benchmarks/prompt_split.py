"""A prompt through packed layers: each thread rebuilding its own rows, against one pass.

The packed layers (bitmask, nm24) serve a prompt by rebuilding their dense rows for torch's
GEMM. sdsprune splits the rows over the threads, and each thread rebuilds and multiplies its
own rows (``sdsprune.inference.tiled``); the obvious alternative, one rebuild pass on all
threads feeding torch's threaded GEMM, is compiled here from the kernels' own source plus a
few lines. Both are timed on the whole prompt forward of real checkpoints against the dense
model, all three in every round (interleaved, so the machine's drift hits them alike), and
the rounds are reported in groups: the cores' placement on a VM changes between groups, and
the one-pass path is slow only in some placements. (A float32 prompt through a layer with
at most ``SPARSE_MM_MAX_KEPT`` of its weights kept is multiplied from the packed form, in
both variants alike: the split matters for bfloat16, denser float32 layers and short
float32 prompts.)

    python benchmarks/prompt_split.py --checkpoint 50%=/tmp/ck/sgpt-05 \\
        --checkpoint 2:4=/tmp/ck/sgpt-24 --dtype bfloat16 \\
        --out benchmarks/results/prompt-split/bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import torch
from sparse_cpu import cpu_name

import sdsprune
from sdsprune.inference import backend_report, bitmask, nm24
from sdsprune.inference.native import build
from sdsprune.inference.tiled import TILED_SOURCE

# The alternative: every row rebuilt in one pass on all threads, then torch's threaded GEMM.
ONE_PASS_BITMASK = r"""
torch::Tensor one_pass(torch::Tensor x, torch::Tensor values, torch::Tensor offsets,
                       torch::Tensor masks, int64_t in) {
  const int64_t out = masks.size(0), chunks = masks.size(1), stride = chunks * CHUNK;
  auto w = scratch_for(out * stride, values.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr());
  char* base = static_cast<char*>(w.data_ptr());
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    expand_range(values, off, m, chunks, begin, end, base + begin * stride * w.element_size());
  });
  auto tile = w.narrow(0, 0, out * stride).view({out, stride}).narrow(1, 0, in);
  return at::linear(x.to(values.scalar_type()), tile).to(x.scalar_type());
}
"""
ONE_PASS_NM24 = r"""
torch::Tensor one_pass(torch::Tensor x, torch::Tensor values, torch::Tensor pos) {
  const int64_t out = values.size(0), half = values.size(1);
  auto w = scratch_for(out * 2 * half, values.options());
  const uint8_t* pp = pos.data_ptr<uint8_t>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    if (values.element_size() == 2)
      expand_rows(static_cast<const uint16_t*>(values.data_ptr()), pp, half, begin, end,
                  static_cast<uint16_t*>(w.data_ptr()) + begin * 2 * half);
    else
      expand_rows(values.data_ptr<float>(), pp, half, begin, end, w.data_ptr<float>() + begin * 2 * half);
  });
  auto dense = w.narrow(0, 0, out * 2 * half).view({out, 2 * half});
  return at::linear(x.to(values.scalar_type()), dense).to(x.scalar_type());
}
"""


def one_pass_extension(kernel: str, source: str, extra: str):
    """A kernel's own source without its op registrations, plus ``one_pass``."""
    body = source[: source.index("TORCH_LIBRARY")]
    ext = build(f"one_pass_{kernel}", TILED_SOURCE + body + extra, ["one_pass"])
    if isinstance(ext, str):
        raise SystemExit(ext)
    return ext


def one_pass_prompts(model: torch.nn.Module) -> None:
    """Every packed layer of ``model`` serves prompts through the one-pass alternative."""
    bitmask_ext = one_pass_extension("bitmask", bitmask.kernel_source(), ONE_PASS_BITMASK)
    nm24_ext = one_pass_extension("nm24", nm24._SOURCE, ONE_PASS_NM24)

    def bitmask_prompt(self, x: torch.Tensor, max_kernel_tokens: int) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        from_packed = self.sparse_mm_layer and tokens >= bitmask.SPARSE_MM_MIN_TOKENS
        if tokens <= max_kernel_tokens or from_packed:
            return bitmask.BitmaskLinear._linear(self, x, max_kernel_tokens)
        flat = x.reshape(-1, self.in_features)
        y = bitmask_ext.one_pass(flat, self.values, self.offsets, self.masks, self.in_features)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def nm24_prompt(self, x: torch.Tensor) -> torch.Tensor:
        y = nm24_ext.one_pass(x.reshape(-1, self.in_features), self.values, self.positions)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    for layer in model.modules():
        if isinstance(layer, bitmask.BitmaskLinear):
            kept = int(layer.offsets[-1]) / (layer.in_features * layer.out_features)
            # the library multiplies these from the packed form (read once, not per call)
            layer.sparse_mm_layer = (
                layer.values.dtype == torch.float32 and kept <= bitmask.SPARSE_MM_MAX_KEPT
            )
            layer._linear = types.MethodType(bitmask_prompt, layer)
        elif isinstance(layer, nm24.Nm24Linear):
            layer.dense_forward = types.MethodType(nm24_prompt, layer)


def load_variants(folder: str, dtype: str) -> dict[str, torch.nn.Module]:
    """dense, ``auto`` as the library serves it (the split) and ``auto`` patched to one pass."""
    models = {
        "dense": sdsprune.load(folder, backend="dense", dtype=dtype).model.eval(),
        "split": sdsprune.load(folder, backend="auto", dtype=dtype).model.eval(),
        "one pass": sdsprune.load(folder, backend="auto", dtype=dtype).model.eval(),
    }
    one_pass_prompts(models["one pass"])
    return models


def timed_groups(models: dict, ids: torch.Tensor, groups: int, rounds: int) -> list[dict]:
    """Per group of rounds, each variant's median prompt seconds (variants interleaved)."""
    out = []
    with torch.inference_mode():
        reference = models["dense"](ids).logits.float()
        for name, model in models.items():
            diff = (model(ids).logits.float() - reference).abs().max().item()
            print(f"  {name}: max |logit - dense| {diff:.4f}", flush=True)
        for _ in range(groups):
            samples = {name: [] for name in models}
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(ids)
                    samples[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(v) for name, v in samples.items()}
            row = {f"{name}_ms": round(s * 1e3, 1) for name, s in medians.items()}
            for name in ("split", "one pass"):
                row[f"{name}_vs_dense"] = round(medians["dense"] / medians[name], 3)
            print("  ", row, flush=True)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="LABEL=FOLDER")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="prompts per forward")
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shape = (args.batch, args.prompt_tokens)
    ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0))
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "batch": args.batch,
        "rounds_per_group": args.rounds,
        "checkpoints": {},
    }
    for spec in args.checkpoint:
        if "=" not in spec:
            parser.error(f"--checkpoint takes LABEL=FOLDER, got '{spec}'")
        label, folder = spec.split("=", 1)
        print(label, flush=True)
        models = load_variants(folder, args.dtype)
        kernels = backend_report(models["split"]).counts()
        print(f"  kernels: {kernels}", flush=True)
        groups = timed_groups(models, ids, args.groups, args.rounds)
        report["checkpoints"][label] = {"folder": folder, "kernels": kernels, "groups": groups}
        del models
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
