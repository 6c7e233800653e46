"""sdsprune deletes only what it created: output and state folders are checked before any
work, an existing output is replaced only when asked, and never one that overlaps the
source, the current directory, the cache or the run's state; what it reads back from disk
cannot run code."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import CORPUS, base_args

from sdsprune.cli import main
from sdsprune.errors import SdspruneError
from sdsprune.options import RunOptions
from sdsprune.ownership import STATE_MARKER, atomic_output_dir, claim_state_folder


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_command(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The CLI entry point in-process, for any command."""
    monkeypatch.setattr(sys, "argv", ["sdsprune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert err.count("error:") == 1, err


@pytest.fixture
def workspace(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> Path:
    """A working directory holding the source model, a corpus and a file of the user's;
    the cache is inside tmp_path too, so that nothing outside it is touched."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_model_dir, work / "model")
    (work / "calib.txt").write_text(CORPUS)
    (work / "notes.txt").write_text("the user's own file")
    monkeypatch.chdir(work)
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    return work


def prune_args(out: str) -> list[str]:
    """A quick prune of the workspace's model; ``out`` verbatim (``""`` and ``./`` too)."""
    args = base_args(Path("model"), Path("calib.txt"), Path("placeholder"))
    args[-1] = out
    return ["prune", *args]


# --- A: the current directory -------------------------------------------------------------


@pytest.mark.parametrize("out", [".", "", "..", "./"])
def test_out_that_is_or_holds_the_current_directory_is_refused(monkeypatch, capsys, workspace, out):
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, *prune_args(out), "--overwrite")
    assert_refused(code, err, "--out")
    assert snapshot(workspace.parent) == before


# --- B: a state folder sdsprune did not make ----------------------------------------------


@pytest.mark.parametrize(
    "state, message",
    [
        ("mine", "did not write"),  # an existing folder of unrelated files
        (".", "current directory"),
        ("model", "source model"),
        ("model/sub", "source model"),
    ],
)
def test_foreign_state_folder_is_refused_before_any_work(
    monkeypatch, capsys, workspace, state, message
):
    (workspace / "mine").mkdir()
    (workspace / "mine" / "data.txt").write_text("keep me")
    before = snapshot(workspace.parent)
    out = str(workspace.parent / "out")
    code, err = run_command(monkeypatch, capsys, *prune_args(out), "--state-dir", state)
    assert_refused(code, err, message)
    assert snapshot(workspace.parent) == before
    assert not (workspace.parent / "out").exists()


def test_a_finished_run_removes_only_the_state_it_wrote(monkeypatch, capsys, workspace):
    """A new state folder disappears after the run; an empty folder the user made stays."""
    out = workspace.parent / "out"
    code, err = run_command(monkeypatch, capsys, *prune_args(str(out)), "--state-dir", "new")
    assert code == 0, err
    assert not (workspace / "new").exists()
    (workspace / "empty").mkdir()
    code, err = run_command(
        monkeypatch, capsys, *prune_args(str(out)), "--overwrite", "--state-dir", "empty"
    )
    assert code == 0, err
    assert (workspace / "empty").is_dir() and not any((workspace / "empty").iterdir())


def test_state_cleanup_keeps_files_sdsprune_did_not_write(tmp_path):
    from sdsprune.engine.checkpoint import remove_state

    state = tmp_path / "state"
    claim_state_folder(state)
    (state / "blocks").mkdir()
    for name in ("manifest.json", "stream-rank0-block00001.safetensors", "blocks/block-00000.safetensors"):  # fmt: skip
        (state / name).write_bytes(b"x")
    (state / "user.txt").write_text("mine")
    (state / "blocks" / "user.bin").write_text("mine too")
    remove_state(state)
    assert snapshot(state) == {"user.txt": b"mine", "blocks/user.bin": b"mine too"}
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / "manifest.json").write_text("{}")
    remove_state(unmarked)  # no marker: not sdsprune's folder, nothing is deleted
    assert (unmarked / "manifest.json").exists()


# --- C: output and state folder overlap ---------------------------------------------------


@pytest.mark.parametrize(
    "out, state, extra",
    [
        ("x", "x", ["--overwrite"]),  # the same folder, existing
        ("fresh", "fresh", []),  # the same folder, not there yet: refused before work
        ("x", "x/state", ["--overwrite"]),
        ("fresh/out", "fresh", []),
    ],
)
def test_output_and_state_folder_must_not_overlap(
    monkeypatch, capsys, workspace, out, state, extra
):
    (workspace / "x").mkdir()
    (workspace / "x" / "data.txt").write_text("keep me")
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, *prune_args(out), "--state-dir", state, *extra)
    assert_refused(code, err, "state folder")
    assert snapshot(workspace.parent) == before
    assert not (workspace / "fresh").exists()


@pytest.mark.parametrize("out", ["model", "model/inner", "."])
def test_out_overlapping_the_source_is_refused(monkeypatch, capsys, workspace, out):
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, *prune_args(out), "--overwrite")
    assert_refused(code, err, "--out")
    assert snapshot(workspace.parent) == before


def test_out_inside_the_cache_or_on_a_file_is_refused(monkeypatch, capsys, workspace):
    cache = workspace.parent / "cache"
    code, err = run_command(monkeypatch, capsys, *prune_args(str(cache / "models" / "x")))
    assert_refused(code, err, "sdsprune cache")
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, *prune_args("notes.txt"), "--overwrite")
    assert_refused(code, err, "not a folder")
    assert snapshot(workspace.parent) == before


# --- D: export onto the parent of its source ----------------------------------------------


@pytest.mark.parametrize("out", [".", "..", "model"])
def test_export_onto_a_folder_holding_its_source_is_refused(monkeypatch, capsys, workspace, out):
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, "export", "model", "--out", out, "--overwrite")
    assert_refused(code, err, "--out")
    assert snapshot(workspace.parent) == before


def test_export_parent_of_source_is_refused_from_elsewhere(monkeypatch, capsys, workspace):
    monkeypatch.chdir(workspace.parent)
    before = snapshot(workspace.parent)
    args = ["export", "work/model", "--out", "work", "--overwrite"]
    code, err = run_command(monkeypatch, capsys, *args)
    assert_refused(code, err, "contains the source model")
    assert snapshot(workspace.parent) == before


# --- E: two runs writing the same output --------------------------------------------------


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as first_tmp:
        (first_tmp / "who").write_text("first")
        refused = pytest.raises(SdspruneError, match="created by someone else")
        with refused, atomic_output_dir(out) as second_tmp:
            (second_tmp / "who").write_text("second")
            out.mkdir()  # another run finished first
            (out / "who").write_text("winner")
        shutil.rmtree(out)
    assert (out / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch, no lock


def test_overwrite_replaces_the_whole_folder_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_folder_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_two_concurrent_prunes_to_one_folder_one_wins(workspace):
    """Both start before either has written: one saves, the other exits 2 with one line."""
    out = workspace.parent / "out"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "sdsprune", *prune_args(str(out)), "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=workspace,
        )
        for seed in (1, 2)
    ]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = 1 if results[0][0] == 0 else 2
    loser_err = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser_err and loser_err.count("error:") == 1, loser_err
    report = json.loads((out / "sdsprune_report.json").read_text())
    assert report["config"]["seed"] == winner
    assert not [p for p in workspace.parent.iterdir() if p.name.startswith(".out")]


# --- what is read back cannot run code ----------------------------------------------------


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _kept_state(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """Run a prune whose state is kept (as a run killed after its last block leaves it)."""
    from conftest import byte_tokenizer, tiny_model

    from sdsprune.engine import runs
    from sdsprune.models import LoadedModel
    from sdsprune.prune import prune

    monkeypatch.setattr(runs, "remove_state", lambda folder: None)
    state = tmp_path / "state"
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(method="wanda", calibration=windows)
    loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny", None)
    prune(loaded, run=RunOptions(device="cpu", progress=False, state_dir=state), **kwargs)
    return state, kwargs


def test_a_tampered_resume_stream_cannot_run_code(tmp_path, monkeypatch):
    from conftest import byte_tokenizer, tiny_model

    from sdsprune.models import LoadedModel
    from sdsprune.prune import prune

    state, kwargs = _kept_state(tmp_path, monkeypatch)
    streams = sorted(state.glob("stream-rank0-block*"))
    assert streams and all(s.suffix == ".safetensors" for s in streams)
    marker = tmp_path / "pwned"
    for stream in streams:  # a pickle where the tensors should be, as torch.save writes it
        torch.save({"hidden": _Payload(marker)}, stream)
    loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny", None)
    with pytest.raises(SdspruneError, match="unreadable run state"):
        resume = RunOptions(device="cpu", progress=False, state_dir=state, resume=True)
        prune(loaded, run=resume, **kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.safetensors", "", "a/b", 7])
def test_sparse_manifest_must_name_a_file_in_its_folder(tmp_path, tiny_model_dir, name):
    from sdsprune.export import MANIFEST, export_checkpoint, load_state_dict

    sparse = tmp_path / "sparse"
    export_checkpoint(tiny_model_dir, sparse)
    shutil.copy(sparse / "sparse_model.safetensors", tmp_path / "outside.safetensors")
    manifest = json.loads((sparse / MANIFEST).read_text())
    manifest["weights_file"] = name
    (sparse / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SdspruneError, match="plain file name"):
        load_state_dict(sparse)
    with pytest.raises(SdspruneError, match="plain file name"):
        export_checkpoint(sparse, tmp_path / "dense", format="dense")
    assert not (tmp_path / "dense").exists()


def test_state_marker_is_written(tmp_path):
    claim_state_folder(tmp_path / "s")
    assert json.loads((tmp_path / "s" / STATE_MARKER).read_text())["created_folder"] is True


# --- the model is saved before optional work ----------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval", "calib.txt", "--eval-seqlen", "100000"], "maximum context"),
        (["--eval", "short.txt", "--eval-seqlen", "64"], "fewer than one chunk"),
        (["--eval", "calib.txt", "--max-chunks", "-1"], "--max-chunks"),
        (["--eval", "calib.txt", "--max-chunks", "0"], "--max-chunks"),
    ],
)
def test_evaluation_inputs_are_checked_before_pruning(
    monkeypatch, capsys, workspace, extra, message
):
    prune_module = importlib.import_module("sdsprune.prune")  # not the re-exported function

    (workspace / "short.txt").write_text("too short")
    monkeypatch.setattr(prune_module, "_memory_plan", _must_not_run)
    code, err = run_command(monkeypatch, capsys, *prune_args("out"), *extra)
    assert_refused(code, err, message)
    assert not (workspace / "out").exists()


def _must_not_run(*args, **kwargs):
    raise AssertionError("pruning started although an input was bad")


def test_a_failing_evaluation_keeps_the_saved_model(monkeypatch, capsys, workspace):
    prune_module = importlib.import_module("sdsprune.prune")  # not the re-exported function

    def failing(*args, **kwargs):
        raise SdspruneError("evaluation broke")

    monkeypatch.setattr(prune_module, "evaluate_corpora", failing)
    code, err = run_command(monkeypatch, capsys, *prune_args("out"), "--eval", "calib.txt")
    assert_refused(code, err, "evaluation broke")
    assert "saved in out" in err
    assert (workspace / "out" / "config.json").exists()
    assert (workspace / "out" / "sdsprune_report.json").exists()


# --- compare's results folder -------------------------------------------------------------


@pytest.mark.parametrize("out", ["mine", ".", "model"])
def test_compare_never_writes_into_a_folder_of_other_files(workspace, out):
    """compare rewrites results.md, results.json and plots in its folder: a folder it did
    not make (or the working directory, or the model) is refused before any work."""
    from sdsprune.compare import compare

    (workspace / "mine").mkdir()
    (workspace / "mine" / "results.md").write_text("the user's own notes")
    before = snapshot(workspace.parent)
    settings = dict(methods=["dense"], sparsities=["0.5"], calib="calib.txt", nsamples=2)
    with pytest.raises(SdspruneError, match="--out"):
        compare("model", **settings, seqlen=32, datasets=["calib.txt"], out=out, device="cpu")
    assert snapshot(workspace.parent) == before


def test_compare_reuses_the_folder_it_made(tmp_path):
    from sdsprune.compare import COMPARE_MARKER
    from sdsprune.ownership import claim_work_folder

    def claim(folder):
        return claim_work_folder(
            folder, flag="--out", marker=COMPARE_MARKER, earlier_signs=("runs",)
        )

    first = claim(tmp_path / "cmp")
    (first / "results.md").write_text("written by compare")
    assert claim(tmp_path / "cmp") == first  # its own marker
    earlier = tmp_path / "old"
    (earlier / "runs").mkdir(parents=True)
    (earlier / "results.md").write_text("from a release without markers")
    assert claim(earlier) == earlier and (earlier / COMPARE_MARKER).exists()


# --- report files (bench --out) -----------------------------------------------------------


def test_a_report_file_is_replaced_only_when_asked(tmp_path):
    from sdsprune.ownership import check_output_file, write_file_atomic

    mine = tmp_path / "mine.json"
    mine.write_text("the user's own file")
    with pytest.raises(SdspruneError, match="already exists"):
        check_output_file(mine, overwrite=False)
    assert check_output_file(mine, overwrite=True) == mine
    with pytest.raises(SdspruneError, match="created by someone else"):
        write_file_atomic(mine, "report", overwrite=False)  # appeared after the check
    assert mine.read_text() == "the user's own file"
    write_file_atomic(mine, "report", overwrite=True)
    assert mine.read_text() == "report"
    write_file_atomic(tmp_path / "new" / "r.json", "fresh", overwrite=False)
    assert (tmp_path / "new" / "r.json").read_text() == "fresh"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine.json", "new", "r.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_report_file_that_names_a_folder_is_refused(tmp_path, overwrite):
    from sdsprune.ownership import check_output_file, write_file_atomic

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("keep")
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(SdspruneError, match="is a folder"):
        check_output_file(tmp_path / "folder", overwrite=overwrite)
    with pytest.raises(SdspruneError, match="plain is not a folder"):
        check_output_file(tmp_path / "plain" / "r.json", overwrite=overwrite)
    with pytest.raises(SdspruneError, match="is a folder"):
        write_file_atomic(tmp_path / "folder", "report", overwrite=overwrite)
    assert snapshot(tmp_path) == {"folder/keep.txt": b"keep", "plain": b"a file, not a folder"}


def test_a_failed_report_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import pathlib

    from sdsprune.ownership import write_file_atomic

    real_write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        real_write_text(self, "half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(SdspruneError, match="No space left on device"):
        write_file_atomic(tmp_path / "r.json", "report", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_bench_out_keeps_a_users_file_unless_overwrite(monkeypatch, capsys, workspace):
    (workspace / "bench.json").write_text("the user's own file")
    quick = ["--backends", "dense", "--repeats", "1", "--warmup", "0", "--prompt-tokens", "4",
             "--decode-tokens", "2", "--batch-sizes", "1", "--out", "bench.json"]  # fmt: skip
    before = snapshot(workspace.parent)
    code, err = run_command(monkeypatch, capsys, "bench", "model", *quick)
    assert_refused(code, err, "already exists (pass --overwrite")
    assert snapshot(workspace.parent) == before
    code, err = run_command(monkeypatch, capsys, "bench", "model", *quick, "--overwrite")
    assert code in (0, None), err
    assert json.loads((workspace / "bench.json").read_text())["settings"]["repeats"] == 1
    assert not list(workspace.glob(".bench.json*"))
