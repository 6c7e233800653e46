import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdsprune", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "eval" in result.stdout
    sub = run_cli("eval", "--help")
    for option in ("--dataset", "--seqlen", "--max-chunks", "--json", "--device", "--dtype"):
        assert option in sub.stdout


def test_eval_json_on_a_local_model(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some evaluation text for the tiny model. " * 20)
    result = run_cli(
        "eval",
        str(tiny_model_dir),
        "--dataset",
        str(corpus),
        "--seqlen",
        "64",
        "--max-chunks",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("perplexity", "tokens", "chunks", "seqlen", "dataset", "model"):
        assert key in report
    assert report["chunks"] == 3 and report["tokens"] == 192


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "no-such-alias"], "unknown model"),
        (["eval", "/no/such/path"], "unknown model"),
        (["eval", "TINY", "--dataset", "EMPTY"], "is empty"),
        # A local corpus: with the bundled one, a fresh machine's first run logs its fetch.
        (["eval", "TINY", "--dataset", "TEXT", "--seqlen", "100000"], "maximum context"),
        (["eval", "TINY", "--dataset", "TEXT", "--max-chunks", "-1"], "--max-chunks"),
        (["eval", "TINY", "--dataset", "TEXT", "--max-chunks", "0"], "--max-chunks"),
        (["eval", "TINY", "--dataset", "TEXT", "--batch-size", "0"], "--batch-size"),
        (["eval", "TINY", "--dataset", "NUMBERS"], "not a string"),
        (["bench", "TINY", "--threads", "0"], "--threads"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("evaluation text. " * 50)
    numbers = tmp_path / "numbers.jsonl"  # a JSONL corpus whose text is not a string
    numbers.write_text('{"text": "fine"}\n{"text": 42}\n')
    files = {"TINY": str(tiny_model_dir), "EMPTY": str(empty), "TEXT": str(text)}
    files["NUMBERS"] = str(numbers)
    args = [files.get(a, a) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_log_level_is_read_in_any_case_and_a_bad_one_is_one_line():
    env = {**os.environ, "SDSPRUNE_LOG": "debug"}
    command = [sys.executable, "-m", "sdsprune", "eval", "--help"]
    assert subprocess.run(command, capture_output=True, text=True, env=env).returncode == 0
    env["SDSPRUNE_LOG"] = "loud"
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "SDSPRUNE_LOG" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# --- every bad input of the careful-user probes, in-process -------------------------------
# Each row names the inputs it needs in upper case; ``_build`` makes them in a working
# folder that also holds files of the user's. A row passes when the command exits 2 with
# one `error:` line, no traceback, and every file in the folder is as it was (nothing
# half-written, nothing replaced, nothing removed).

CORPUS = "The quick brown fox jumps over the lazy dog while pruning sparse models. " * 40
QUICK_BENCH = "--backends dense --repeats 1 --warmup 0 --prompt-tokens 4 --decode-tokens 2 \
--batch-sizes 1"
PRUNE = "--method wanda --nsamples 4 --seqlen 16 --device cpu"
COMPARE = "--methods dense --sparsity 0.5 --calib calib.txt --nsamples 2 --seqlen 32 \
--dataset calib.txt --device cpu"


def _edited_model(work: Path, name: str, **config_edit) -> str:
    folder = work / name.lower()
    shutil.copytree(work / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_edit}))
    return folder.name


def _sparse(work: Path, name: str, **config_edit) -> str:
    from sdsprune.export import export_checkpoint

    export_checkpoint(work / "model", work / name.lower())
    config_file = work / name.lower() / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_edit}))
    return name.lower()


def _outside_manifest(work: Path, name: str) -> str:
    """A sparse export whose manifest names a weights file outside its folder (a readable
    one: following it would succeed, so only the name check can refuse it)."""
    from sdsprune.export import MANIFEST

    folder = work / _sparse(work, name)
    outside = work.parent / "outside.safetensors"
    shutil.copy(folder / "sparse_model.safetensors", outside)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "weights_file": str(outside)}))
    return folder.name


def _corrupt(work: Path, name: str) -> str:
    folder = work / name.lower()
    shutil.copytree(work / "model", folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    return folder.name


def _damaged_state(work: Path, name: str, monkeypatch, damage) -> str:
    """A finished prune's state kept (as a kill after the last block would), then damaged."""
    from sdsprune.engine import runs

    with monkeypatch.context() as patch:
        patch.setattr(runs, "remove_state", lambda folder: None)
        args = f"prune model {PRUNE} --calib calib.txt --state-dir {name.lower()}"
        code = _run(patch, *args.split(), "--out", str(work.parent / name))
    assert code in (0, None)
    damage(work / name.lower())
    return name.lower()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_into(path: Path) -> None:
    """What a tampered state holds: a pickle (as torch.save writes) where tensors belong."""
    import torch

    torch.save({"hidden": torch.zeros(2)}, path)


def _done_past_the_end(state: Path) -> None:
    manifest = state / "manifest.json"
    manifest.write_text(re.sub(r'"done": \d+', '"done": 99', manifest.read_text()))


STATE_DAMAGE = {
    "STATE_DONE_PAST_END": _done_past_the_end,
    "STATE_EMPTY_LIST": lambda s: (s / "manifest.json").write_text("[]"),
    "STATE_NOT_JSON": lambda s: (s / "manifest.json").write_text('{"done": '),
    "STATE_TRUNCATED_BLOCK": lambda s: _truncate(s / "blocks" / "block-00001.safetensors"),
    "STATE_TRUNCATED_STREAM": lambda s: _truncate(next(s.glob("stream-*block00001*"))),
    "STATE_MISSING_STREAM": lambda s: next(s.glob("stream-*block00001*")).unlink(),
    "STATE_PICKLED_STREAM": lambda s: _pickle_into(next(s.glob("stream-*block00001*"))),
}


def _build(name: str, work: Path, monkeypatch) -> str:
    """Make the input a row's placeholder names, in ``work``; returns the argument."""
    if name in STATE_DAMAGE:
        return _damaged_state(work, name, monkeypatch, STATE_DAMAGE[name])
    builders = {
        "SPARSE": lambda: _sparse(work, name),
        "SPARSE_OTHER_SHAPE": lambda: _sparse(work, name, intermediate_size=96),
        "SPARSE_OUTSIDE_FILE": lambda: _outside_manifest(work, name),
        "MORE_LAYERS": lambda: _edited_model(work, name, num_hidden_layers=3),
        "OTHER_SHAPE": lambda: _edited_model(work, name, intermediate_size=96),
        "CORRUPT": lambda: _corrupt(work, name),
        "STATE_KEPT": lambda: _damaged_state(work, name, monkeypatch, lambda state: None),
    }
    return builders[name]() if name in builders else name


def _run(monkeypatch, *args: str) -> int | None:
    """The CLI entry point in-process (an interpreter start per row would take seconds)."""
    from sdsprune.cli import main

    monkeypatch.setattr(sys, "argv", ["sdsprune", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root``, hidden ones too (files with their bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def work(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> Path:
    """The working directory: the model, local texts, and files and a folder of the user's."""
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copytree(tiny_model_dir, folder / "model")
    (folder / "calib.txt").write_text(CORPUS)
    (folder / "short.txt").write_text("too short")
    (folder / "one-window.txt").write_text("x" * 16)  # 16 byte tokens: one window of 16
    (folder / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    (folder / "mine").mkdir()
    (folder / "mine" / "results.md").write_text("the user's own notes")
    (folder / "user.json").write_text('{"the": "user\'s own file"}')
    monkeypatch.chdir(folder)
    monkeypatch.setenv("SDSPRUNE_CACHE", str(tmp_path / "cache"))
    return folder


def bad(command: str, message: str, env: dict | None = None, *, marks=()):
    """A row: the command, a part of its error message, and environment settings."""
    name = f"{command} {' '.join(f'{k}={v}' for k, v in (env or {}).items())}".strip()
    return pytest.param(command, message, env or {}, id=name, marks=marks)


# Not writable even by root (tests may run as root, for whom chmod denies nothing).
UNWRITABLE = "/sys/sdsprune-cache"
NEEDS_SYS = pytest.mark.skipif(not Path("/sys").is_dir(), reason="no /sys (not Linux)")


RESUME = "--calib calib.txt --resume --out out --state-dir"
BAD_INPUTS = [
    # bench --out: a user's file, a folder, inside the model, empty
    bad("bench SPARSE {bench} --out user.json", "already exists (pass --overwrite"),
    bad("bench SPARSE {bench} --out mine", "is a folder"),
    bad("bench SPARSE {bench} --out sparse/r.json", "inside the model"),
    bad("bench SPARSE {bench} --out ''", "--out is empty"),
    # bench: prompt and decode past the context; sparse folders that do not fit their config
    bad("bench SPARSE --prompt-tokens 300", "maximum context of 256"),
    bad("bench SPARSE --prompt-tokens 250 --decode-tokens 16", "(250 + 16 = 266) exceed"),
    bad("bench SPARSE_OTHER_SHAPE {bench}", "6 of another shape"),
    bad("bench SPARSE_OUTSIDE_FILE {bench}", "plain file name"),
    # eval
    bad("eval model --dataset short.txt --seqlen 64", "fewer than one chunk"),
    bad("eval SPARSE_OTHER_SHAPE --dataset calib.txt --seqlen 64", "6 of another shape"),
    bad("eval MORE_LAYERS --dataset calib.txt --seqlen 64", "9 missing"),
    bad("eval SPARSE_OUTSIDE_FILE --dataset calib.txt --seqlen 64", "plain file name"),
    bad("eval model --dataset wiki --seqlen 64", "SDSPRUNE_CACHE", {"SDSPRUNE_CACHE": "user.json"}),
    bad(
        "eval model --dataset wiki --seqlen 64",
        "SDSPRUNE_CACHE",
        {"SDSPRUNE_CACHE": UNWRITABLE},
        marks=NEEDS_SYS,
    ),
    # prune
    bad("prune MORE_LAYERS {prune} --calib calib.txt --out out", "9 missing"),
    bad("prune OTHER_SHAPE {prune} --calib calib.txt --low-memory --out out", "6 of another"),
    bad("prune model {prune} --calib one-window.txt --nsamples 1 --out out", "one window of 16"),
    bad("prune model {prune} --calib numbers.jsonl --out out", "not a string"),
    bad("prune model {prune} --calib calib.txt --eval short.txt --out out", "fewer than one"),
    *[bad(f"prune model {{prune}} {RESUME} {state}", "run state") for state in STATE_DAMAGE],
    bad("prune model {prune} --calib calib.txt --out out --state-dir STATE_KEPT", "--resume"),
    # export
    bad("export CORRUPT --out out", "cannot read the weights"),
    bad("export SPARSE_OUTSIDE_FILE --out out --format dense", "plain file name"),
    # compare --out: a folder of the user's files, a file
    bad("compare model {compare} --out mine", "did not write"),
    bad("compare model {compare} --out user.json", "is not a folder"),
]


@pytest.mark.parametrize("command, message, env", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_every_file_as_it_was(
    command, message, env, work, monkeypatch, capsys
):
    words = shlex.split(command.format(bench=QUICK_BENCH, prune=PRUNE, compare=COMPARE))
    args = [_build(word, work, monkeypatch) if word.isupper() else word for word in words]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()  # what building the inputs printed
    before = _snapshot(work)
    code = _run(monkeypatch, *args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err  # no progress before it
    assert _snapshot(work) == before
