import json
import os
import subprocess
import sys

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
