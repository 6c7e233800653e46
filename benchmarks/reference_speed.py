"""Time sdsprune's SparseGPT and Wanda against the reference implementations' own code.

The reference repositories are NOT part of sdsprune: extract them anywhere and pass the
folders. Their model drivers (opt.py, llama.py, main.py) do not run on transformers 5, but
their per-layer cores do, so this script loads them at run time:

* SparseGPT (github.com/IST-DASLab/sparsegpt): ``SparseGPT`` from ``sparsegpt.py``
  (``add_batch``, ``fasterprune``, ``free``); its ``print`` is silenced and, on a machine
  without CUDA, ``torch.cuda.synchronize`` becomes a no-op (fasterprune calls it).
* Wanda (github.com/locuslab/wanda): ``WrappedGPT`` from ``lib/layerwrapper.py``; the
  scoring/mask code is the ``for name in subset:`` loop of ``prune_wanda`` in
  ``lib/prune.py``, taken out of the source with ``ast`` and executed as written (importing
  lib/prune.py would pull in their data loaders).

Their sequential loop (llama.py ``llama_sequential`` without --true-sequential, and
``prune_wanda``) is re-created here: per block, forward every calibration window (one at a
time, as they do) with their ``add_batch`` hooks, prune every linear layer with their
code, forward every window again for the next block's inputs. Both sides use the same
model, the same windows and the block inputs/kwargs captured by
``sdsprune.engine.capture_block_inputs``; runs are interleaved and repeated (medians).

    git --git-dir=<mirror of IST-DASLab/sparsegpt> archive HEAD | tar -x -C /tmp/ref-sparsegpt
    git --git-dir=<mirror of locuslab/wanda> archive HEAD | tar -x -C /tmp/ref-wanda
    python benchmarks/reference_speed.py --sparsegpt-dir /tmp/ref-sparsegpt \\
        --wanda-dir /tmp/ref-wanda --out benchmarks/results/reference_speed
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (as sdsprune does)

import argparse
import ast
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sdsprune
from sdsprune.engine import capture_block_inputs
from sdsprune.evaluate.perplexity import with_bos
from sdsprune.models.blocks import block_linears, decoder_blocks
from sdsprune.pruners import SparsityPattern


def _silent(*_args, **_kwargs) -> None:
    return None


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference_sparsegpt(folder: Path):
    sys.path.insert(0, str(folder))  # sparsegpt.py does `from quant import *`
    try:
        module = _load_module("ref_sparsegpt", folder / "sparsegpt.py")
    finally:
        sys.path.remove(str(folder))
    module.print = _silent
    return module.SparseGPT


def load_reference_wanda(folder: Path):
    wrapped = _load_module("ref_wanda_layerwrapper", folder / "lib" / "layerwrapper.py")
    source = (folder / "lib" / "prune.py").read_text()
    tree = ast.parse(source)
    function = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "prune_wanda"
    )
    loops = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.For)
        and isinstance(node.target, ast.Name)
        and node.target.id == "name"
        and isinstance(node.iter, ast.Name)
        and node.iter.id == "subset"
        and "W_metric" in ast.unparse(node)
    ]
    if len(loops) != 1:
        raise SystemExit(f"expected one scoring loop in prune_wanda, found {len(loops)}")
    code = compile(ast.Module(body=loops, type_ignores=[]), str(folder / "lib/prune.py"), "exec")
    return wrapped.WrappedGPT, code


@contextlib.contextmanager
def cuda_sync_noop():
    """fasterprune calls torch.cuda.synchronize(); a CPU-only torch raises there."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = _silent
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def _first(out):
    return out[0]  # their `layer(...)[0]`: a tuple's first item, or a tensor's only window


@torch.no_grad()
def reference_loop(blocks, stream, method, pattern, refs) -> dict[str, float]:
    """Their sequential loop over ``blocks``; returns seconds per phase."""
    phases = {"stats_pass": 0.0, "solve": 0.0, "output_pass": 0.0}
    nsamples = stream.hidden.shape[0]
    inps = stream.hidden.clone()
    outs = torch.zeros_like(inps)
    if pattern.is_nm:
        prune_n, prune_m, sparsity = pattern.n, pattern.m, 0.0
    else:
        prune_n, prune_m, sparsity = 0, 0, pattern.fraction
    for i, layer in enumerate(blocks):
        args, kwargs = stream.block_args[i], stream.block_kwargs[i]
        subset = block_linears(layer)  # all nn.Linear in module order, like their find_layers
        start = time.perf_counter()
        cls = refs["sparsegpt"] if method == "sparsegpt" else refs["wanda"][0]
        wrapped = {name: cls(subset[name]) for name in subset}

        def add_batch(name, wrapped=wrapped):
            def tmp(_, inp, out):
                wrapped[name].add_batch(inp[0].data, out.data)

            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
        for j in range(nsamples):
            outs[j] = _first(layer(inps[j].unsqueeze(0), *args, **kwargs))
        for h in handles:
            h.remove()
        phases["stats_pass"] += time.perf_counter() - start
        start = time.perf_counter()
        if method == "sparsegpt":
            with cuda_sync_noop():
                for name in subset:
                    wrapped[name].fasterprune(
                        sparsity, prunen=prune_n, prunem=prune_m, percdamp=0.01, blocksize=128
                    )
                    wrapped[name].free()
        else:
            namespace = {
                "torch": torch,
                "print": _silent,
                "i": i,
                "subset": subset,
                "wrapped_layers": wrapped,
                "prune_n": prune_n,
                "prune_m": prune_m,
                "args": argparse.Namespace(sparsity_ratio=sparsity, use_variant=False),
                "return_given_alpha": None,
            }
            exec(refs["wanda"][1], namespace)
        phases["solve"] += time.perf_counter() - start
        start = time.perf_counter()
        for j in range(nsamples):
            outs[j] = _first(layer(inps[j].unsqueeze(0), *args, **kwargs))
        inps, outs = outs, inps
        phases["output_pass"] += time.perf_counter() - start
    return phases


def snapshot(blocks) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}": layer.weight.detach().clone()
        for i, block in enumerate(blocks)
        for name, layer in block_linears(block).items()
    }


def agreement(ours: dict, ref: dict, prefix: str = "") -> dict:
    names = [n for n in ours if n.startswith(prefix)]
    same = total = 0
    max_abs = 0.0
    diff_sq = ref_sq = 0.0
    for n in names:
        a, b = ours[n].float(), ref[n].float()
        same += int(((a == 0) == (b == 0)).sum())
        total += a.numel()
        max_abs = max(max_abs, float((a - b).abs().max()))
        diff_sq += float((a - b).square().sum())
        ref_sq += float(b.square().sum())
    return {
        "mask_agreement": same / total,
        "max_abs_diff": max_abs,
        "rel_fro_diff": (diff_sq / max(ref_sq, 1e-30)) ** 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsegpt-dir", type=Path, required=True)
    parser.add_argument("--wanda-dir", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6, help="keep only the first N blocks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="sparsegpt:2:4,wanda:2:4,sparsegpt:0.5,wanda:0.5")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    cli = parser.parse_args()

    torch.set_num_threads(cli.threads)
    refs = {
        "sparsegpt": load_reference_sparsegpt(cli.sparsegpt_dir.resolve()),
        "wanda": load_reference_wanda(cli.wanda_dir.resolve()),
    }
    loaded = sdsprune.load_model(cli.model, device="cpu", dtype="float32")
    net = loaded.model
    blocks = decoder_blocks(net)
    del blocks[cli.blocks :]
    net.config.num_hidden_layers = len(blocks)
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    windows = sdsprune.sample_calibration(
        sdsprune.load_corpus("wiki", "calib"), loaded.tokenizer, cli.nsamples, cli.seqlen, seed=0
    )
    windows = with_bos(windows, net, loaded.tokenizer)  # what sdsprune.prune does too

    configs = []
    for item in cli.configs.split(","):
        method, spec = item.split(":", 1)
        configs.append((method, SparsityPattern.parse(spec)))
    runs = {(m, str(p)): {"ours": [], "ref": []} for m, p in configs}
    weights = {}

    def run_ours(method, pattern):
        net.load_state_dict(dense)
        start = time.perf_counter()
        result = sdsprune.prune(
            loaded,
            method,
            sparsity=pattern,
            calibration=windows,
            run=sdsprune.RunOptions(device="cpu", progress=False),
        )
        wall = time.perf_counter() - start
        t = result.report["timings"]
        return {
            "loop": t["prune"],
            "capture": t["capture"],
            "end_to_end": wall,
            "stats_pass": t.get("stats_pass", 0.0),
            "solve": t.get("solve", 0.0),
            "output_pass": t.get("output_pass", 0.0),
        }

    def run_ref(method, pattern):
        net.load_state_dict(dense)
        start = time.perf_counter()
        # batch 1: the reference drivers' Catcher also sees one window per call
        stream = capture_block_inputs(net, windows, torch.device("cpu"), batch_size=1)
        capture = time.perf_counter() - start
        loop_start = time.perf_counter()
        phases = reference_loop(blocks, stream, method, pattern, refs)
        loop = time.perf_counter() - loop_start
        return {"loop": loop, "capture": capture, "end_to_end": loop + capture, **phases}

    for rep in range(cli.repeats):
        for k, (method, pattern) in enumerate(configs):
            order = ["ours", "ref"] if (rep + k) % 2 == 0 else ["ref", "ours"]
            for side in order:
                timing = (run_ours if side == "ours" else run_ref)(method, pattern)
                runs[(method, str(pattern))][side].append(timing)
                if rep == 0:
                    weights[(method, str(pattern), side)] = snapshot(blocks)
                print(
                    f"rep {rep} {method} {pattern} {side}: loop {timing['loop']:.2f} s "
                    f"(stats {timing['stats_pass']:.2f}, solve {timing['solve']:.2f}, "
                    f"output {timing['output_pass']:.2f})",
                    flush=True,
                )

    rows = []
    for method, pattern in configs:
        key = (method, str(pattern))

        def med(side, field, key=key):
            return statistics.median(r[field] for r in runs[key][side])

        ours_w, ref_w = weights[(*key, "ours")], weights[(*key, "ref")]
        rows.append(
            {
                "method": method,
                "pattern": str(pattern),
                "ours_s": med("ours", "loop"),
                "ref_s": med("ref", "loop"),
                "ratio": med("ours", "loop") / med("ref", "loop"),
                "ours_end_to_end_s": med("ours", "end_to_end"),
                "ref_end_to_end_s": med("ref", "end_to_end"),
                "ours_phases": {f: med("ours", f) for f in ("stats_pass", "solve", "output_pass")},
                "ref_phases": {f: med("ref", f) for f in ("stats_pass", "solve", "output_pass")},
                "agreement_block0": agreement(ours_w, ref_w, "0."),
                "agreement_all": agreement(ours_w, ref_w),
                "runs": runs[key],
            }
        )
    meta = {
        "model": cli.model,
        "blocks": len(blocks),
        "nsamples": cli.nsamples,
        "seqlen": cli.seqlen,
        "repeats": cli.repeats,
        "threads": cli.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "command": " ".join(sys.argv),
    }
    table = [
        "| method | pattern | ours s | reference s | ratio ours/ref | ours stats/solve/output s "
        "| ref stats/solve/output s | mask agreement block 0 | mask agreement all | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op, rp = r["ours_phases"], r["ref_phases"]
        table.append(
            f"| {r['method']} | {r['pattern']} | {r['ours_s']:.2f} | {r['ref_s']:.2f} "
            f"| {r['ratio']:.2f} "
            f"| {op['stats_pass']:.2f} / {op['solve']:.2f} / {op['output_pass']:.2f} "
            f"| {rp['stats_pass']:.2f} / {rp['solve']:.2f} / {rp['output_pass']:.2f} "
            f"| {r['agreement_block0']['mask_agreement']:.4%} "
            f"| {r['agreement_all']['mask_agreement']:.4%} "
            f"| {r['agreement_all']['max_abs_diff']:.3g} |"
        )
    print("\n".join(table))
    if cli.out is not None:
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        cli.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        cli.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
