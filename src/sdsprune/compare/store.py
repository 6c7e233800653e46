"""What a comparison folder keeps between invocations: prune records, models, evaluations.

Pruning is the expensive part of a comparison, and a researcher keeps changing what is
measured (one more task, another corpus, more examples). So each run's pieces are stored
separately, each under a key holding everything its result depends on:

* ``pruned/<run>/prune.json``: how the model was pruned (settings, report, time); and with
  ``keep_models``, ``pruned/<run>/model/``: the pruned model as a compact sparse checkpoint
  (``sdsprune export --format sparse``: bit-identical weights, about half the size at 2:4).
* ``evals/<run>/<corpus or task>-<hash>.json``: one corpus's perplexity or one task's
  accuracy, keyed by the model's settings plus that evaluation's own settings.

A later invocation evaluates only what is missing, and prunes only when a missing
evaluation needs a model that was not kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sdsprune.models import LoadedModel

log = logging.getLogger(__name__)

PRUNED_DIR = "pruned"
EVALS_DIR = "evals"
PRUNE_RECORD = "prune.json"
MODEL_DIR = "model"
# Settings of a comparison that only choose what is measured: a model does not depend on them.
EVALUATION_SETTINGS = (
    "datasets",
    "tasks",
    "eval_seqlen",
    "max_chunks",
    "limit",
    "task_seed",
    "prompt_style",
)


def model_settings(run_settings: dict) -> dict:
    """What a run's model depends on (model, method settings, dtype, format), nothing else."""
    return {k: v for k, v in run_settings.items() if k not in EVALUATION_SETTINGS}


def perplexity_key(run_settings: dict, dataset: str) -> dict:
    """Everything one corpus's perplexity depends on."""
    return {
        "kind": "perplexity",
        "dataset": dataset,
        "eval_seqlen": run_settings["eval_seqlen"],
        "max_chunks": run_settings["max_chunks"],
        "model": model_settings(run_settings),
    }


def task_key(run_settings: dict, task: str) -> dict:
    """Everything one task's accuracy depends on (BIG-bench: also the conversion's version)."""
    from sdsprune.evaluate import bigbench

    return {
        "kind": "task",
        "task": task,
        "limit": run_settings["limit"],
        "task_seed": run_settings["task_seed"],
        "prompt_style": run_settings["prompt_style"],
        "task_format": bigbench.FORMAT_VERSION if bigbench.is_bigbench(task) else None,
        "model": model_settings(run_settings),
    }


def evaluation_keys(run_settings: dict) -> list[dict]:
    """The evaluations a run needs: each corpus's perplexity, then each task's accuracy."""
    keys = [perplexity_key(run_settings, dataset) for dataset in run_settings["datasets"]]
    return keys + [task_key(run_settings, task) for task in run_settings["tasks"]]


def _default_knobs() -> dict[str, dict]:
    """Today's SDS and OWL defaults, as a comparison's settings spell them out."""
    from sdsprune.owl import OWLConfig
    from sdsprune.sds import SDSConfig

    return {"sds": asdict(SDSConfig()), "owl": asdict(OWLConfig())}


def earlier_form(settings: dict) -> dict:
    """``settings`` as releases before the knobs were spelled out stored them: None for SDS
    or OWL at its defaults. Pieces stored that way are read as made under today's defaults
    (the last change of a default, the block re-fit, came before any was committed)."""
    defaults = _default_knobs()
    return {k: None if defaults.get(k) == v else v for k, v in settings.items()}


class RunStore:
    """The stored pieces of one run (``key``: the run's file-name-safe name) in ``folder``."""

    def __init__(self, folder: Path, key: str, run_settings: dict):
        self.pruned = folder / PRUNED_DIR / key
        self.evals = folder / EVALS_DIR / key
        self.settings = run_settings

    # ------------------------------------------------------------------ evaluations
    def evaluation(self, key: dict) -> dict | None:
        """A stored evaluation with exactly this key (or its earlier form), or None."""
        for candidate in (key, {**key, "model": earlier_form(key["model"])}):
            stored = read_json(self._evaluation_file(candidate))
            if stored is not None and stored.get("key") == candidate:
                return stored.get("result")
        return None

    def save_evaluation(self, key: dict, result: dict) -> None:
        write_json_atomic(self._evaluation_file(key), {"key": key, "result": result})

    def _evaluation_file(self, key: dict) -> Path:
        name = key.get("dataset") or key.get("task") or key["kind"]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).name or name).strip("-")
        return self.evals / f"{key['kind']}-{slug}-{digest}.json"

    # ------------------------------------------------------------------ pruning
    def prune_record(self) -> dict | None:
        """How this run's model was pruned, if it was pruned with the current settings."""
        stored = read_json(self.pruned / PRUNE_RECORD)
        wanted = model_settings(self.settings)
        if stored is None or stored.get("settings") not in (wanted, earlier_form(wanted)):
            return None
        return stored

    def save_prune_record(self, record: dict) -> None:
        """Store ``record`` (report, figures, seconds) under the current model settings; a
        kept model pruned with other settings is removed first, so it is never reused."""
        if self.prune_record() is None:
            shutil.rmtree(self.pruned / MODEL_DIR, ignore_errors=True)
        write_json_atomic(
            self.pruned / PRUNE_RECORD, {**record, "settings": model_settings(self.settings)}
        )

    def kept_model(self, device: str) -> LoadedModel | None:
        """The kept pruned model, loaded, if there is one for the current settings."""
        from sdsprune.inference.loader import load

        folder = self.pruned / MODEL_DIR
        if self.prune_record() is None or not (folder / "config.json").exists():
            return None
        log.info("reusing the pruned model kept in %s", folder)
        return load(folder, device=device, decode="eager")

    def keep_model(self, loaded: LoadedModel) -> None:
        """Save ``loaded`` as a compact sparse checkpoint (written whole, or not at all)."""
        from sdsprune.export import export_checkpoint

        self.pruned.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.pruned, prefix=".dense-") as scratch:
            loaded.model.save_pretrained(scratch)
            loaded.tokenizer.save_pretrained(scratch)
            export_checkpoint(scratch, self.pruned / MODEL_DIR, format="sparse", overwrite=True)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (then recomputed)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable %s (recomputing it)", path)
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` in one step, so an interrupted write leaves no torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
