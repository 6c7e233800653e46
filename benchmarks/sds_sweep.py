"""Several pruning configurations in one process: one model load, one calibration sample.

Each configuration prunes a fresh copy of the model on the same wiki calibration windows
(seed 0) and is evaluated on the wiki and news **validation** splits (1024-token chunks;
``--corpora`` changes them): settings are chosen there, and the evaluation splits are read once
the choice is made; one JSON line per configuration (perplexities, prune seconds, SDS block
errors and, with the distillation stage, its held-out KL per epoch). Cheaper than
protocol.py's one process per row when exploring, and every row sees the same windows.

The loaded dense model is evaluated first, on the same chunks (its line is labelled
``dense``), so that an SDS row whose base pruner is an earlier configuration also gets
``gap_closed``: per corpus, the share of that base's log-perplexity gap to dense the row closes
(1: as good as dense, 0: no better than the base), with its 95% paired bootstrap interval over
the chunks (:func:`sdsprune.stats.gap_closed`; null where the base is not clearly worse than
dense). List each base configuration before its SDS configurations.

    python benchmarks/sds_sweep.py --nsamples 32 --seqlen 256 --chunks 20 --sparsity 2:4 \
        --configs '[["sparsegpt", {"method": "sparsegpt"}], ["sds+b2", {"block_epochs": 2}]]'
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence

from sdsprune.data import load_corpus, sample_calibration
from sdsprune.errors import SdspruneError
from sdsprune.evaluate.perplexity import evaluate_corpora
from sdsprune.methods import SDS, Method, parse_method
from sdsprune.models import load_model
from sdsprune.options import RunOptions
from sdsprune.prune import prune
from sdsprune.stats import gap_closed


def method_of(settings: dict) -> Method:
    """The method ``settings`` describe: ``method`` (default ``sds``) and, for SDS, ``base``
    (default ``sparsegpt``) and the SDS settings (the rest)."""
    settings = dict(settings)
    method = settings.pop("method", "sds")
    pruner = settings.pop("base", "sparsegpt")
    if method == "sds":
        return SDS(**settings, base=parse_method(pruner))
    if parse_method(pruner) != SDS().base:
        raise SdspruneError(f"base applies to method sds only (got method {method})")
    return parse_method(method)


def run_config(base, windows, sparsity: str, settings: dict) -> dict:
    """Prune a copy of ``base`` with ``settings`` (``method``/``base`` keys, the rest SDS)."""
    loaded = copy.deepcopy(base)
    result = prune(
        loaded,
        method_of(settings),
        sparsity=sparsity,
        calibration=windows,
        run=RunOptions(progress=False),
    )
    sds = result.report.get("sds", {})
    extra = {k: v for k, v in sds.items() if k.startswith("mean") or k == "distill"}
    return {"model": loaded, "secs": round(result.report["timings"]["prune_total"], 1), **extra}


def gaps_closed(results: Sequence[dict], base: Sequence[dict], dense: Sequence[dict]) -> dict:
    """Per corpus: the share of ``base``'s gap to ``dense`` a row closes, from the chunk NLLs
    of the three evaluations (rounded, as the perplexities are); None without a clear gap."""
    shares = {}
    for mine, theirs, reference in zip(results, base, dense, strict=True):
        interval = gap_closed(mine["chunk_nll"], theirs["chunk_nll"], reference["chunk_nll"])
        shares[mine["dataset"]] = (
            None
            if interval is None
            else {key: round(getattr(interval, key), 3) for key in ("estimate", "low", "high")}
        )
    return shares


def emit(row: dict, out: str | None) -> None:
    """Print one JSON line, and append it to ``out`` when given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--configs", required=True, help="JSON list of [label, settings]")
    parser.add_argument(
        "--corpora", default="wiki:valid,news:valid", help="evaluation corpora (name:split)"
    )
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()
    base = load_model(args.model)
    windows = sample_calibration(
        load_corpus("wiki", "calib"), base.tokenizer, args.nsamples, args.seqlen, 0
    )
    corpora = [load_corpus(name) for name in args.corpora.split(",")]

    def evaluate(model) -> list[dict]:
        """Every row's perplexities, dense's too: the same corpora and chunks."""
        return evaluate_corpora(
            model, base.tokenizer, corpora, seqlen=1024, max_chunks=args.chunks, progress=False
        )

    dense = evaluate(base.model)
    emit({"label": "dense", **{r["dataset"]: round(r["perplexity"], 3) for r in dense}}, args.out)
    evaluated = []  # (method, results) of each configuration so far: the possible bases
    for label, settings in json.loads(args.configs):
        outcome = run_config(base, windows, args.sparsity, settings)
        loaded = outcome.pop("model")
        results = evaluate(loaded.model)
        method = method_of(settings)
        evaluated.append((method, results))
        base_results = next(
            (r for m, r in evaluated if isinstance(method, SDS) and m == method.base), None
        )
        row = {
            "label": label,
            "settings": settings,
            "sparsity": args.sparsity,
            "calibration": f"wiki {args.nsamples}x{args.seqlen} seed 0",
            **{r["dataset"]: round(r["perplexity"], 3) for r in results},
            **outcome,
        }
        if base_results is not None:
            row["gap_closed"] = gaps_closed(results, base_results, dense)
        emit(row, args.out)


if __name__ == "__main__":
    main()
