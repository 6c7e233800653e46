"""compare(): run list, shared calibration, resume, and the three outputs."""

from __future__ import annotations

import importlib
import json
import math
import shutil

import pytest

from sdsprune.compare import Run, compare, mean_accuracy, parse_runs, results_markdown
from sdsprune.errors import SdspruneError
from sdsprune.methods import OWL, SDS, format_method, report_settings
from sdsprune.models import load_model

WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun"
prune_module = importlib.import_module("sdsprune.prune")
compare_run = importlib.import_module("sdsprune.compare.run")


# the settings of a comparison on wiki perplexity (tests add their tasks)
WIKI_SETTINGS = {
    "model": "m",
    "calib": "wiki",
    "nsamples": 4,
    "seqlen": 8,
    "seed": 0,
    "datasets": ["wiki"],
    "eval_seqlen": 8,
    "max_chunks": None,
}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    words = WORDS.split(" ")
    path.write_text(" ".join(words[i * 7 % len(words)] for i in range(3000)))
    return path


def _settings(model, corpus, out, **overrides) -> dict:
    settings = dict(
        methods=["dense", "wanda", "sds:wanda"],
        sparsities=["2:4", "0.5"],
        calib=str(corpus),
        nsamples=2,
        seqlen=32,
        datasets=[str(corpus)],
        max_chunks=2,
        out=out,
        device="cpu",
        progress=False,
    )
    settings.update(overrides)
    return {"model": str(model), **settings}


@pytest.fixture
def fake_prune(monkeypatch):
    """Record every prune call; 'prune' by zeroing nothing, and give SDS runs a figure."""
    calls = []

    def prune(model, method, *, sparsity, calibration, run):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from sdsprune.sds.figures import render_png

        stored = report_settings(method)
        calls.append((stored["method"], stored["base"], sparsity, calibration.windows.clone()))
        report = {"summary": {"sparsity": 0.5}, "timings": {}, "memory": {}}
        if isinstance(method, SDS):
            fig, ax = plt.subplots()
            ax.hist([0.0, 1.0])
            report["_figures"] = {"weight_distribution.png": render_png(fig)}
        return prune_module.PruneResult(model=load_model(model), report=report)

    monkeypatch.setattr(prune_module, "prune", prune)
    return calls


def one_run(label: str, sparsity: str | None) -> Run:
    """The comparison's row for a method string at a sparsity (``dense``: no sparsity)."""
    return parse_runs([label], [] if label == "dense" else [sparsity])[0]


def test_runs_are_dense_once_then_each_method_at_each_sparsity():
    runs = parse_runs(["dense", "wanda", "sds:wanda", "sds"], ["2:4", "0.50", "2:4"])
    assert [(r.label, r.sparsity) for r in runs] == [
        ("dense", None),
        ("wanda", "2:4"),
        ("sds:wanda", "2:4"),
        ("sds:sparsegpt", "2:4"),
        ("wanda", "0.5"),
        ("sds:wanda", "0.5"),
        ("sds:sparsegpt", "0.5"),
    ]
    assert runs[2].key == "sds-wanda_2-4"
    assert parse_runs(["dense"], []) == [Run()]


@pytest.mark.parametrize(
    "methods, sparsities, message",
    [
        (["lasso"], ["0.5"], "unknown method 'lasso'"),
        (["sds:lasso"], ["0.5"], "unknown SDS base"),
        (["wanda:x"], ["0.5"], "unknown method"),
        (["wanda"], ["1.5"], "between 0 and 1"),
        (["wanda"], [], "no sparsity"),
        ([], ["0.5"], "no methods"),
    ],
)
def test_bad_run_lists_are_refused(methods, sparsities, message):
    with pytest.raises(SdspruneError, match=message):
        parse_runs(methods, sparsities)


def test_compare_resumes_finished_runs(tiny_model_dir, corpus, tmp_path, fake_prune):
    out = tmp_path / "cmp"
    first = compare(**_settings(tiny_model_dir, corpus, out))
    assert [(m, b, s) for m, b, s, _ in fake_prune] == [
        ("wanda", None, "2:4"),
        ("sds", "wanda", "2:4"),
        ("wanda", None, "0.5"),
        ("sds", "wanda", "0.5"),
    ]
    windows = [call[3] for call in fake_prune]
    assert all(w.shape == (2, 32) and (w == windows[0]).all() for w in windows)  # shared
    assert [run["key"] for run in first["runs"]] == [
        "dense",
        "wanda_2-4",
        "sds-wanda_2-4",
        "wanda_0.5",
        "sds-wanda_0.5",
    ]
    assert (out / "figures" / "sds-wanda_2-4-weight_distribution.png").exists()

    fake_prune.clear()
    again = compare(**_settings(tiny_model_dir, corpus, out))
    assert fake_prune == []  # nothing recomputed
    assert again["runs"] == first["runs"]

    (out / "runs" / "wanda_0.5.json").unlink()  # its pieces are stored: reassembled as is
    assert compare(**_settings(tiny_model_dir, corpus, out))["runs"] == first["runs"]
    assert fake_prune == []
    for stored in ("runs/wanda_0.5.json", "pruned/wanda_0.5", "evals/wanda_0.5"):
        shutil.rmtree(out / stored) if (out / stored).is_dir() else (out / stored).unlink()
    compare(**_settings(tiny_model_dir, corpus, out))
    assert [(m, s) for m, _, s, _ in fake_prune] == [("wanda", "0.5")]

    fake_prune.clear()  # a new method is added; the others are reused
    compare(**_settings(tiny_model_dir, corpus, out, methods=["dense", "wanda", "magnitude"]))
    assert [(m, s) for m, _, s, _ in fake_prune] == [("magnitude", "2:4"), ("magnitude", "0.5")]


def test_changed_settings_recompute_only_what_depends_on_them(
    tiny_model_dir, corpus, tmp_path, fake_prune
):
    out = tmp_path / "cmp"
    compare(
        **_settings(tiny_model_dir, corpus, out, methods=["dense", "wanda"], sparsities=["0.5"])
    )
    dense_file = out / "runs" / "dense.json"
    stamp = dense_file.stat().st_mtime_ns
    fake_prune.clear()
    # More calibration windows: the pruned run is redone, dense (no calibration) is not.
    compare(
        **_settings(
            tiny_model_dir, corpus, out, methods=["dense", "wanda"], sparsities=["0.5"], nsamples=3
        )
    )
    assert [(m, s) for m, _, s, _ in fake_prune] == [("wanda", "0.5")]
    assert dense_file.stat().st_mtime_ns == stamp
    # Another evaluation length changes every result.
    fake_prune.clear()
    compare(
        **_settings(
            tiny_model_dir,
            corpus,
            out,
            methods=["dense", "wanda"],
            sparsities=["0.5"],
            nsamples=3,
            eval_seqlen=16,
        )
    )
    assert [(m, s) for m, _, s, _ in fake_prune] == [("wanda", "0.5")]
    assert dense_file.stat().st_mtime_ns != stamp


def test_changing_the_shown_metric_or_spelling_out_dtype_recomputes_nothing(
    tiny_model_dir, corpus, tmp_path, fake_prune
):
    out = tmp_path / "cmp"
    kwargs = _settings(tiny_model_dir, corpus, out, methods=["dense", "wanda"], sparsities=["0.5"])
    compare(**kwargs, metric="acc_norm")
    fake_prune.clear()
    results = compare(**kwargs, metric="acc", dtype="float32")  # what "auto" means on CPU
    assert fake_prune == [] and results["settings"]["metric"] == "acc"
    with pytest.raises(SdspruneError, match="unknown metric 'f1'"):
        compare(**kwargs, metric="f1")


def test_run_files_from_before_prompt_styles_are_reused(
    tiny_model_dir, corpus, tmp_path, fake_prune
):
    out = tmp_path / "cmp"
    kwargs = _settings(tiny_model_dir, corpus, out, methods=["wanda"], sparsities=["0.5"])
    compare(**kwargs)
    path = out / "runs" / "wanda_0.5.json"
    stored = json.loads(path.read_text())
    del stored["settings"]["prompt_style"]
    path.write_text(json.dumps(stored))
    fake_prune.clear()
    compare(**kwargs)
    assert fake_prune == []
    # Older files with tasks were scored with BIG-bench's listed-choices prompts.
    old = {"tasks": ["bigbench:winowhy"], "limit": 100}
    assert compare_run._upgraded(old) == {**old, "prompt_style": "bigbench"}


def _restore_sds_settings(out, key: str, sds) -> None:
    """Rewrite every stored piece of run ``key`` (run file, prune record, evaluations) as if
    it had been made with SDS settings ``sds``."""
    from sdsprune.compare.store import RunStore

    path = out / "runs" / f"{key}.json"
    stored = json.loads(path.read_text())
    stored["settings"]["sds"] = sds
    path.write_text(json.dumps(stored))
    record = out / "pruned" / key / "prune.json"
    pruned = json.loads(record.read_text())
    pruned["settings"]["sds"] = sds
    record.write_text(json.dumps(pruned))
    store = RunStore(out, key, {})
    for file in sorted((out / "evals" / key).iterdir()):
        evaluation = json.loads(file.read_text())
        file.unlink()
        evaluation["key"]["model"]["sds"] = sds
        store.save_evaluation(evaluation["key"], evaluation["result"])


def test_sds_runs_made_under_other_defaults_are_recomputed(
    tiny_model_dir, corpus, tmp_path, fake_prune
):
    """Defaults are stored spelled out, so a run made under another release's SDS defaults is
    redone, while one stored in the earlier form (None for the defaults) is reused whole."""
    out = tmp_path / "cmp"
    kwargs = _settings(tiny_model_dir, corpus, out, sparsities=["0.5"])
    first = compare(**kwargs)
    defaults = first["settings"]["sds"]
    assert defaults["block_windows"] == 16  # spelled out, not None
    _restore_sds_settings(out, "sds-wanda_0.5", None)
    fake_prune.clear()
    again = compare(**kwargs)
    assert fake_prune == []
    assert [r["perplexity"] for r in again["runs"]] == [r["perplexity"] for r in first["runs"]]
    _restore_sds_settings(out, "sds-wanda_0.5", {**defaults, "rounds": 7})
    compare(**kwargs)
    assert [(m, b, s) for m, b, s, _ in fake_prune] == [("sds", "wanda", "0.5")]


def test_sds_settings_recompute_only_the_sds_runs(tiny_model_dir, corpus, tmp_path, fake_prune):
    out = tmp_path / "cmp"
    kwargs = _settings(tiny_model_dir, corpus, out, sparsities=["0.5"])
    compare(**kwargs)
    fake_prune.clear()
    compare(**kwargs, sds=SDS())  # the defaults spelled out: nothing to redo
    assert fake_prune == []
    compare(**kwargs, sds=SDS(schedule="staged", adjust_iters=5))
    assert [(m, b, s) for m, b, s, _ in fake_prune] == [("sds", "wanda", "0.5")]


def test_unreadable_run_file_is_recomputed(tiny_model_dir, corpus, tmp_path, fake_prune):
    out = tmp_path / "cmp"
    kwargs = _settings(tiny_model_dir, corpus, out, methods=["wanda"], sparsities=["0.5"])
    compare(**kwargs)
    (out / "runs" / "wanda_0.5.json").write_text("{truncated")
    fake_prune.clear()
    compare(**kwargs)  # rebuilt from the stored prune record and evaluation
    assert fake_prune == []
    assert json.loads((out / "runs" / "wanda_0.5.json").read_text())["key"] == "wanda_0.5"
    (out / "runs" / "wanda_0.5.json").write_text("{truncated")
    (evaluation,) = (out / "evals" / "wanda_0.5").iterdir()
    evaluation.write_text("{truncated")
    compare(**kwargs)  # the evaluation is redone, on a model pruned again (none was kept)
    assert len(fake_prune) == 1
    assert json.loads(evaluation.read_text())["key"]["dataset"] == str(corpus)


def test_real_pruning_writes_the_three_outputs(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "cmp"
    results = compare(
        **_settings(
            tiny_model_dir, corpus, out, methods=["dense", "magnitude", "wanda"], sparsities=["2:4"]
        )
    )
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "perplexity.png"}
    stored = json.loads((out / "results.json").read_text())
    assert stored["runs"] == results["runs"]
    dense, _magnitude, wanda = results["runs"]
    assert wanda["prune"]["summary"]["sparsity"] == pytest.approx(0.5)
    assert dense["prune"] == {}
    ppl = {run["key"]: run["perplexity"][str(corpus)] for run in results["runs"]}
    assert all(value > 1 for value in ppl.values())
    table = (out / "results.md").read_text()
    assert "| Method | Sparsity |" in table
    assert "| Dense | 0% |" in table and "| Wanda | 2:4 |" in table
    assert "![perplexity](perplexity.png)" in table


def test_tasks_are_validated_before_any_pruning(tiny_model_dir, corpus, tmp_path, fake_prune):
    with pytest.raises(SdspruneError, match="unknown BIG-bench"):
        compare(**_settings(tiny_model_dir, corpus, tmp_path / "cmp", tasks=["bigbench:nope"]))
    assert fake_prune == []


def test_rows_of_one_method_with_other_options_are_named_apart():
    runs = [
        {
            "run": {"method": "sds", "base": "sparsegpt", "sparsity": "2:4"},
            "label": label,
            "key": label,
            "settings": {"tasks": []},
            "perplexity": {"wiki": ppl},
            "tasks": [],
            "prune": {},
            "figures": [],
            "seconds": {"prune": 1.0, "total": 2.0},
        }
        for label, ppl in [
            ("sds:sparsegpt", 30.0),
            ("sds[adjust=never;distill_epochs=0]:sparsegpt", 31.0),
            ("sds:sparsegpt[blocksize=64]", 32.0),
            ("sds[adjust=never]:sparsegpt[blocksize=64]", 33.0),
        ]
    ]
    table = results_markdown({"settings": {**WIKI_SETTINGS, "tasks": []}, "runs": runs})
    assert "| SDS (SparseGPT) | 2:4 | **30.00** |" in table
    assert "| SDS (SparseGPT) [adjust=never;distill_epochs=0] | 2:4 | 31.00 |" in table
    assert "| SDS (SparseGPT) [sparsegpt: blocksize=64] | 2:4 | 32.00 |" in table
    assert "| SDS (SparseGPT) [adjust=never; sparsegpt: blocksize=64] | 2:4 | 33.00 |" in table


def test_markdown_table_with_tasks_marks_best_and_chance():
    runs = []
    for method, sparsity, ppl, acc in [
        ("dense", None, 10.0, 0.6),
        ("wanda", "0.5", 20.0, 0.5),
        ("sparsegpt", "0.5", 15.0, 0.55),
    ]:
        run = one_run(method, sparsity)
        runs.append(
            {
                "run": {"method": method, "base": None, "sparsity": sparsity},
                "label": run.label,
                "key": run.key,
                "settings": {"tasks": ["bigbench:winowhy"]},
                "perplexity": {"wiki": ppl},
                "tasks": [
                    {
                        "task": "bigbench:winowhy",
                        "acc": acc,
                        "acc_norm": acc + 0.1,
                        "chance": 0.5,
                        "majority": 0.69,
                        "acc_stderr": 0.049,
                        "acc_norm_stderr": 0.03,
                    }
                ],
                "prune": {},
                "figures": [],
                "seconds": {"prune": 1.0, "total": 2.0},
            }
        )
    settings = {
        **WIKI_SETTINGS,
        "tasks": ["bigbench:winowhy"],
        "limit": 10,
        "task_seed": 42,
        "prompt_style": "cloze",
    }
    table = results_markdown({"settings": settings, "runs": runs})
    assert "| Method | Sparsity | wiki PPL ↓ | winowhy ↑ |" in table
    assert "Mean acc" not in table  # one task: no mean column repeating it
    assert "| SparseGPT | 0.5 | **15.00** | 55.0 |" in table
    assert "| Wanda | 0.5 | 20.00 | 50.0 |" in table
    assert (
        "Chance level (uniform guess; constant answer where a task has one answer set): "
        "winowhy 50.0 / 69.0. One standard error: about 4.9 points."
    ) in table
    assert "(lm-evaluation-harness acc: total answer log-likelihood)" in table

    normed = results_markdown({"settings": {**settings, "metric": "acc_norm"}, "runs": runs})
    assert "| SparseGPT | 0.5 | **15.00** | 65.0 |" in normed
    assert "acc_norm: answer log-likelihood per byte" in normed
    assert "One standard error: about 3.0 points." in normed


def test_mean_accuracy_counts_each_requested_task_once():
    run = {
        "settings": {"tasks": ["bigbench:winowhy", "bigbench:cause_and_effect"]},
        "tasks": [
            {"task": "bigbench:winowhy", "acc": 0.6},
            {"task": "bigbench:cause_and_effect/one_sentence", "acc": 1.0},
            {"task": "bigbench:cause_and_effect", "acc": 0.8},
        ],
    }
    assert mean_accuracy(run, "acc") == pytest.approx(0.7)


def test_paper_grid_with_new_bases_and_owl_rows():
    """The grid of the paper's tables: base vs SDS-base x sparsity, OWL rows only where
    OWL applies (unstructured sparsities)."""
    methods = ["dense", "admm", "sds:admm", "sparsegpt+owl", "sds:sparsegpt+owl"]
    runs = parse_runs(methods, ["0.7", "2:4"])
    assert [(r.label, r.sparsity) for r in runs] == [
        ("dense", None),
        ("admm", "0.7"),
        ("sds:admm", "0.7"),
        ("sparsegpt+owl", "0.7"),
        ("sds:sparsegpt+owl", "0.7"),
        ("admm", "2:4"),
        ("sds:admm", "2:4"),
    ]
    assert runs[4].key == "sds-sparsegpt-owl_0.7"
    options = parse_runs(["sds:dsnot[initial=sparsegpt;max_cycles=10]"], ["0.6"])[0]
    assert options.record()["base"] == "dsnot[initial=sparsegpt;max_cycles=10]"
    assert options.key == "sds-dsnot-initial-sparsegpt-max_cycles-10_0.6"


@pytest.mark.parametrize(
    "methods, message",
    [
        (["dense+owl"], "unknown method 'dense\\+owl'"),
        (["sds:dsnot[colour=red]"], "bad option"),
        (["admm[rho=x]"], "expected a float"),
    ],
)
def test_bad_grid_specs_are_refused(methods, message):
    with pytest.raises(SdspruneError, match=message):
        parse_runs(methods, ["0.5"])


def test_owl_runs_get_owl_and_only_they_depend_on_its_knobs(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    calls = []

    def prune(model, method, **kwargs):
        calls.append(format_method(method))
        report = {"summary": {"sparsity": 0.5}, "timings": {}, "memory": {}}
        if isinstance(method, OWL):
            report["owl"] = {"blocks": [{"block": 0, "outlier_ratio": 0.1, "sparsity": 0.5}]}
        return prune_module.PruneResult(model=load_model(model), report=report)

    monkeypatch.setattr(prune_module, "prune", prune)
    out = tmp_path / "cmp"
    kwargs = _settings(
        tiny_model_dir, corpus, out, methods=["wanda", "wanda+owl"], sparsities=["0.5", "2:4"]
    )
    results = compare(**kwargs)
    assert calls == ["wanda", "wanda+owl", "wanda"]
    owl_run = results["runs"][1]
    assert owl_run["prune"]["owl"]["blocks"][0]["sparsity"] == 0.5
    assert "| Wanda + OWL | 0.5 |" in (out / "results.md").read_text()
    calls.clear()
    compare(**kwargs, owl=OWL(lam=0.05))
    assert calls == ["wanda+owl[lam=0.05]"]


TOY_TASK = {
    "name": "toy",
    "examples": [
        {"input": f"Is {word} a fruit?", "target_scores": {"yes": int(fruit), "no": int(not fruit)}}
        for word, fruit in [("apple", True), ("stone", False), ("pear", True), ("chair", False)]
    ],
}


@pytest.fixture
def toy_tasks(tmp_path, monkeypatch) -> list[str]:
    """Two small BIG-bench tasks in a private cache, so nothing is downloaded."""
    from sdsprune.evaluate import bigbench

    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    names = ["winowhy", "social_iqa"]
    for name in names:
        path = bigbench.task_cache() / name / "task.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(TOY_TASK))
    return [f"bigbench:{name}" for name in names]


@pytest.fixture
def evaluations(monkeypatch) -> list[str]:
    """Record each evaluation compare() computes: a corpus or a task name."""
    api = importlib.import_module("sdsprune.api")
    zeroshot = importlib.import_module("sdsprune.evaluate.zeroshot")
    calls: list[str] = []
    real_model, real_tasks = api.evaluate_model, zeroshot.evaluate_tasks

    def evaluate_model(loaded, *, datasets, **kwargs):
        calls.extend(datasets)
        return real_model(loaded, datasets=datasets, **kwargs)

    def evaluate_tasks(loaded, tasks, **kwargs):
        calls.extend(tasks)
        return real_tasks(loaded, tasks, **kwargs)

    monkeypatch.setattr(api, "evaluate_model", evaluate_model)
    monkeypatch.setattr(zeroshot, "evaluate_tasks", evaluate_tasks)
    return calls


def test_kept_models_are_reused_when_a_task_is_added(
    tiny_model_dir, corpus, tmp_path, fake_prune, toy_tasks, evaluations
):
    out = tmp_path / "cmp"
    kwargs = _settings(
        tiny_model_dir, corpus, out, sparsities=["2:4"], tasks=toy_tasks[:1], keep_models=True
    )
    first = compare(**kwargs)
    assert [(m, s) for m, _, s, _ in fake_prune] == [("wanda", "2:4"), ("sds", "2:4")]
    assert (out / "pruned" / "sds-wanda_2-4" / "model" / "config.json").exists()
    fake_prune.clear()
    evaluations.clear()

    second = compare(**{**kwargs, "tasks": toy_tasks})
    assert fake_prune == []  # nothing pruned again
    assert evaluations == ["bigbench:social_iqa"] * 3  # only the new task, on each model
    for before, after in zip(first["runs"], second["runs"], strict=True):
        assert after["tasks"][0] == before["tasks"][0]
        assert after["perplexity"] == before["perplexity"]
        assert [row["task"] for row in after["tasks"]] == toy_tasks

    evaluations.clear()  # an evaluation setting changes: re-evaluated, still not re-pruned
    compare(**{**kwargs, "tasks": toy_tasks, "limit": 3})
    assert fake_prune == [] and sorted(evaluations) == sorted(toy_tasks * 3)


def test_without_kept_models_only_missing_evaluations_are_computed(
    tiny_model_dir, corpus, tmp_path, fake_prune, toy_tasks, evaluations
):
    out = tmp_path / "cmp"
    kwargs = _settings(
        tiny_model_dir, corpus, out, methods=["wanda"], sparsities=["2:4"], tasks=toy_tasks[:1]
    )
    compare(**kwargs)
    assert not (out / "pruned" / "wanda_2-4" / "model").exists()
    fake_prune.clear()
    evaluations.clear()
    compare(**{**kwargs, "tasks": toy_tasks})
    assert len(fake_prune) == 1 and evaluations == ["bigbench:social_iqa"]


def test_a_kept_model_has_the_pruned_weights(tiny_model_dir, corpus, tmp_path):
    import torch

    from sdsprune.compare.store import RunStore
    from sdsprune.options import Calibration
    from sdsprune.prune import prune

    settings = {"model": str(tiny_model_dir), "dtype": "float32", "datasets": [], "tasks": []}
    store = RunStore(tmp_path, "magnitude_2-4", settings)
    calibration = Calibration(corpus=str(corpus), seqlen=32)
    pruned = prune(str(tiny_model_dir), "magnitude", sparsity="2:4", calibration=calibration).model
    assert store.kept_model("cpu") is None  # no prune record yet
    store.save_prune_record({"report": {}, "figures": [], "seconds": 1.0})
    store.keep_model(pruned)
    kept = store.kept_model("cpu")
    expected = pruned.model.state_dict()
    for name, tensor in kept.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # Other model settings: the kept model is not reused, and is dropped when they are stored.
    other = RunStore(tmp_path, "magnitude_2-4", {**settings, "dtype": "bfloat16"})
    assert other.kept_model("cpu") is None
    other.save_prune_record({"report": {}, "figures": [], "seconds": 1.0})
    assert not (tmp_path / "pruned" / "magnitude_2-4" / "model").exists()


def test_paired_intervals_in_the_outputs(tiny_model_dir, corpus, tmp_path, fake_prune, toy_tasks):
    """The fake pruning changes nothing, so every method equals dense: each paired difference
    is exactly none, its interval contains it, and the outputs say it is not significant."""
    out = tmp_path / "cmp"
    results = compare(**_settings(tiny_model_dir, corpus, out, sparsities=["2:4"], tasks=toy_tasks))
    pairs = [(c["run"], c["reference"]) for c in results["paired"]]
    assert pairs == [
        ("wanda_2-4", "dense"),
        ("sds-wanda_2-4", "wanda_2-4"),
        ("sds-wanda_2-4", "dense"),
    ]
    for comparison in results["paired"]:
        ratio = comparison["perplexity"][str(corpus)]
        assert ratio["estimate"] == 1.0 and ratio["low"] <= 1 <= ratio["high"]
        assert comparison["mean"]["estimate"] == 0 and not comparison["mean"]["significant"]
        assert set(comparison["tasks"]) == set(toy_tasks)
    stored = json.loads((out / "runs" / "wanda_2-4.json").read_text())
    assert len(stored["chunk_nll"][str(corpus)]) == 2  # max_chunks
    assert stored["tasks"][0]["per_example"]["doc_id"] == [0, 1, 2, 3]
    summary = json.loads((out / "results.json").read_text())
    assert (
        "chunk_nll" not in summary["runs"][0]
        and "per_example" not in summary["runs"][0]["tasks"][0]
    )
    table = (out / "results.md").read_text()
    assert "## Paired differences" in table
    assert "(1.00x, 95% CI 1.00-1.00)" in table  # a perplexity cell against the reference
    assert "- SDS (Wanda) 2:4 vs Wanda 2:4: " in table
    assert "mean accuracy +0.0 points (95% CI +0.0 to +0.0): not significant" in table
    assert "not significant (the interval includes no difference)" in table


def test_paper_suite_offline_fails_before_any_pruning(
    tiny_model_dir, corpus, tmp_path, fake_prune, offline_harness
):
    from sdsprune.evaluate.zeroshot import PAPER_SUITE

    offline_harness({name: f"org/{name}" for name in PAPER_SUITE})
    with pytest.raises(SdspruneError, match=r"^offline: 7 task\(s\) need datasets"):
        compare(**_settings(tiny_model_dir, corpus, tmp_path / "cmp", tasks=["paper"]))
    assert fake_prune == []


def _run_with_examples(method: str, correct: dict[str, list[int]], base=None) -> dict:
    """A run record whose leaf tasks have these per-example results (acc = acc_norm)."""
    tasks = ["bigbench:winowhy", "bigbench:cause_and_effect"]
    leaves = ["bigbench:cause_and_effect/one_sentence", "bigbench:cause_and_effect/two_sentences"]
    rows = []
    for name, values in correct.items():
        examples = {"doc_id": list(range(len(values))), "acc": values, "acc_norm": values}
        mean = sum(values) / len(values)
        rows.append({"task": name, "acc": mean, "acc_norm": mean, "per_example": examples})
    composite = [r["acc_norm"] for r in rows if r["task"] in leaves]
    rows.append(
        {
            "task": "bigbench:cause_and_effect",
            "acc_norm": sum(composite) / 2,
            "subtasks": leaves,
            "per_example": None,
        }
    )
    run = one_run(f"sds:{base}" if base else method, "2:4")
    return {
        "run": {"method": method, "base": base, "sparsity": run.sparsity},
        "key": run.key,
        "settings": {"tasks": tasks},
        "tasks": rows,
        "chunk_nll": {},
    }


def test_paired_mean_difference_is_the_difference_of_the_table_means():
    """A composite task counts once, as the mean of its subtasks, in the paired mean too."""
    from sdsprune.compare.paired import paired_comparisons

    dense = _run_with_examples(
        "dense",
        {
            "bigbench:winowhy": [1, 0, 1, 1],
            "bigbench:cause_and_effect/one_sentence": [1, 1],
            "bigbench:cause_and_effect/two_sentences": [0, 0, 1],
        },
    )
    wanda = _run_with_examples(
        "wanda",
        {
            "bigbench:winowhy": [0, 0, 1, 1],
            "bigbench:cause_and_effect/one_sentence": [1, 0],
            "bigbench:cause_and_effect/two_sentences": [1, 1, 1],
        },
    )
    settings = {"datasets": [], "tasks": ["bigbench:winowhy", "bigbench:cause_and_effect"]}
    (comparison,) = paired_comparisons([dense, wanda], settings, "acc_norm")
    expected = mean_accuracy(wanda) - mean_accuracy(dense)
    assert comparison["mean"]["estimate"] == pytest.approx(expected)
    assert comparison["tasks"]["bigbench:winowhy"]["estimate"] == pytest.approx(-0.25)
    assert comparison["tasks"]["bigbench:cause_and_effect"]["estimate"] == pytest.approx(
        ((0.5 - 1) + (1 - 1 / 3)) / 2
    )
    # Other examples on one side (another --limit subset): no paired interval, not a wrong one.
    wanda["tasks"][0]["per_example"]["doc_id"] = [0, 1, 2, 5]
    (comparison,) = paired_comparisons([dense, wanda], settings, "acc_norm")
    assert comparison["tasks"]["bigbench:winowhy"] is None and comparison["mean"] is None


def test_owl_runs_are_paired_with_the_same_method_at_uniform_sparsity():
    """What OWL adds is read from an OWL run against its uniform twin, not only against dense."""
    from sdsprune.compare.paired import reference_pairs

    def run(method, base=None, owl=False):
        spec = one_run((f"sds:{base}" if base else method) + ("+owl" if owl else ""), "0.7")
        return {
            "run": {"method": method, "base": base, "sparsity": spec.sparsity, "owl": owl},
            "key": spec.key,
        }

    runs = [
        run("dense"),
        run("sparsegpt"),
        run("sparsegpt", owl=True),
        run("sds", "sparsegpt"),
        run("sds", "sparsegpt", owl=True),
        run("wanda", owl=True),  # its uniform twin is not in the comparison
    ]
    pairs = {(a["key"], b["key"]) for a, b in reference_pairs(runs)}
    assert pairs == {
        ("sparsegpt_0.7", "dense"),
        ("sparsegpt-owl_0.7", "sparsegpt_0.7"),
        ("sparsegpt-owl_0.7", "dense"),
        ("sds-sparsegpt_0.7", "sparsegpt_0.7"),
        ("sds-sparsegpt_0.7", "dense"),
        ("sds-sparsegpt-owl_0.7", "sparsegpt-owl_0.7"),
        ("sds-sparsegpt-owl_0.7", "sds-sparsegpt_0.7"),
        ("sds-sparsegpt-owl_0.7", "dense"),
        ("wanda-owl_0.7", "dense"),
    }


def _run_with_chunks(label: str, sparsity: str | None, ppl: float) -> dict:
    """A run record whose two wiki chunks both have perplexity ``ppl``."""
    run = one_run(label, sparsity)
    method, _, base = label.partition(":")
    return {
        "run": {"method": method, "base": base or None, "sparsity": sparsity},
        "label": run.label,
        "key": run.key,
        "settings": {"tasks": []},
        "perplexity": {"wiki": ppl},
        "chunk_nll": {"wiki": [math.log(ppl)] * 2},
        "tasks": [],
        "prune": {},
        "figures": [],
        "seconds": {"prune": 1.0, "total": 2.0},
    }


def test_gap_closed_is_shown_for_sds_runs_with_a_base_and_dense():
    """SDS 46.54 over SparseGPT 72.22 with dense 18.30 closes 32% of the gap; a run without a
    base (or SDS whose base is not in the comparison) shows a dash."""
    from sdsprune.compare.paired import paired_comparisons

    runs = [
        _run_with_chunks("dense", None, 18.30),
        _run_with_chunks("sparsegpt", "2:4", 72.22),
        _run_with_chunks("sds:sparsegpt", "2:4", 46.54),
        _run_with_chunks("sds:wanda", "2:4", 50.0),  # its base, Wanda, is not compared
    ]
    settings = {**WIKI_SETTINGS, "tasks": []}
    paired = paired_comparisons(runs, settings, "acc_norm")
    gaps = {(c["run"], c["reference"]): c["gap_closed"] for c in paired}
    assert gaps[("sds-sparsegpt_2-4", "sparsegpt_2-4")]["wiki"]["estimate"] == pytest.approx(
        math.log(72.22 / 46.54) / math.log(72.22 / 18.30)
    )
    assert [key for key, gap in gaps.items() if gap is not None] == [
        ("sds-sparsegpt_2-4", "sparsegpt_2-4")
    ]
    table = results_markdown({"settings": settings, "runs": runs, "paired": paired})
    assert "| Method | Sparsity | wiki PPL ↓ | wiki gap closed ↑ |" in table
    assert (
        "| SDS (SparseGPT) | 2:4 | **46.54** (0.64x, 95% CI 0.64-0.64) | 32% (95% CI 32 to 32%) |"
        in table
    )
    assert "| SparseGPT | 2:4 | 72.22 (3.95x, 95% CI 3.95-3.95) | — |" in table
    assert "| SDS (Wanda) | 2:4 | 50.00 (2.73x, 95% CI 2.73-2.73) | — |" in table
    assert "| Dense | 0% | 18.30 | — |" in table
    assert "closes 32% (95% CI 32 to 32%) of the wiki gap to dense" in table
    # Without dense there is no gap to close: the table keeps its earlier columns.
    without_dense = runs[1:]
    paired = paired_comparisons(without_dense, settings, "acc_norm")
    table = results_markdown({"settings": settings, "runs": without_dense, "paired": paired})
    assert "gap closed" not in table and "| SDS (SparseGPT) | 2:4 | **46.54** (0.64x" in table
