"""The method configs: one source for the command line's flags, method strings and the
report's settings, each of which reads back into the config it came from."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from sdsprune.cli_flags import method_flags
from sdsprune.errors import SdspruneError
from sdsprune.methods import (
    ADMM,
    CONFIG_CLASSES,
    OWL,
    SDS,
    DSnoT,
    Magnitude,
    PrunerZero,
    SparseGPT,
    Wanda,
    format_method,
    method_from_report,
    parse_method,
    report_settings,
)
from sdsprune.settings import settings_of

# Every setting of every method differs from its default in at least one example (checked
# below), so the round trips cover each field, nested SDS and OWL included.
EXAMPLES = [
    Magnitude(),
    Wanda(),
    PrunerZero(),
    SparseGPT(),
    SparseGPT(blocksize=64, percdamp=0.05),
    ADMM(iterations=30, growth_iterations=10, rho=0.5, percdamp=0.2),
    DSnoT(initial="sparsegpt", max_cycles=10, update_threshold=0.2, variance_power=0.5),
    SDS(),
    SDS(base=Wanda()),
    SDS(
        base=DSnoT(initial="magnitude"),
        schedule="staged",
        data_mode="kd",
        solver="fista",
        lambda1=0.1,
        residual_start=False,
        figure_layer="0.mlp.up_proj",
    ),
    SDS(
        base=ADMM(rho=2.0),
        redense_iters=100,
        lr=0.2,
        lambda2=0.1,
        mu=0.5,
        adjust="always",
        adjust_solver="gd",
        adjust_iters=10,
        adjust_data="kd",
        group_sweeps=2,
        rounds=2,
        block_epochs=3,
        block_lr=0.02,
        block_batch=2,
        block_windows=0,
        block_redense=1,
        block_redense_lr=0.1,
        distill_epochs=2,
        distill_lr=0.01,
        distill_batch=4,
    ),
    OWL(inner=Wanda()),
    OWL(inner=SDS(base=ADMM(rho=2.0), mu=0.5), threshold=3.0, lam=0.05),
]
IDS = [format_method(method) for method in EXAMPLES]


def _configs(method) -> list:
    """The method and every config nested in it."""
    nested = [getattr(method, name) for name in ("base", "inner") if hasattr(method, name)]
    return [method, *(config for inner in nested for config in _configs(inner))]


def test_examples_change_every_setting_of_every_method():
    changed = {
        (type(config), name)
        for method in EXAMPLES
        for config in _configs(method)
        for name, value in settings_of(config).items()
        if value != settings_of(type(config)())[name]
    }
    wanted = {(cls, name) for cls in CONFIG_CLASSES for name in settings_of(cls())}
    assert wanted - changed == set()


@pytest.mark.parametrize("method", EXAMPLES, ids=IDS)
def test_method_string_reads_back_into_the_config(method):
    text = format_method(method)
    assert parse_method(text) == method
    assert "," not in text  # fits in compare's comma-separated lists


@pytest.mark.parametrize("method", EXAMPLES, ids=IDS)
def test_report_settings_read_back_into_the_config(method):
    stored = json.loads(json.dumps(report_settings(method)))  # as the report file holds them
    assert method_from_report(stored) == method


@pytest.mark.parametrize("method", EXAMPLES, ids=IDS)
def test_compare_labels_read_back_with_the_shared_settings(method):
    """compare's labels leave out what ``--sds`` and the ``--owl-*`` flags set for every run."""
    presets = {"sds": {"schedule": "staged", "block_epochs": 0}, "owl": {"lam": 0.05}}
    assert parse_method(format_method(method, presets), presets) == method


def test_short_strings_for_default_settings():
    assert format_method(SDS(base=Wanda())) == "sds:wanda"
    assert format_method(OWL(inner=SDS())) == "sds:sparsegpt+owl"
    assert parse_method("sds") == SDS(base=SparseGPT())
    assert format_method(DSnoT(max_cycles=5)) == "dsnot[max_cycles=5]"
    assert report_settings(SDS(base=Wanda()))["method"] == "sds"
    assert report_settings(SDS(base=Wanda()))["base"] == "wanda"
    assert report_settings(Wanda())["base"] is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lasso", "unknown method 'lasso' (choose from magnitude, wanda, "),
        ("wanda:sparsegpt", "unknown method 'wanda:sparsegpt'"),
        ("sds:lasso", "unknown SDS base 'lasso' in 'sds:lasso'"),
        ("sds:sds", "unknown SDS base 'sds'"),
        ("wanda+lasso", "unknown method 'wanda+lasso'"),
        ("wanda+owl+owl", "unknown method 'wanda+owl+owl'"),
        ("sds[mu=0.5", "unknown method 'sds[mu=0.5'"),
        ("dsnot[colour=red]", "bad option 'colour=red' for dsnot"),
        ("sds[mu]:wanda", "bad option 'mu' for sds"),
        ("admm[rho=fast]", "admm option rho=fast: expected a float"),
        ("sds[residual_start=maybe]", "expected a bool"),
        ("wanda+owl[lam=2]", "0 <= lambda < 1"),
        ("admm[growth_iterations=30]", "growth_iterations <= iterations"),
        ("sds[schedule=weekly]", "unknown schedule 'weekly'"),
    ],
)
def test_bad_method_strings_are_refused_with_one_clear_line(text, message):
    with pytest.raises(SdspruneError) as refused:
        parse_method(text)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def prune_help() -> str:
    env = {**os.environ, "COLUMNS": "250"}  # long flag names are not cut short
    command = [sys.executable, "-m", "sdsprune", "prune", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda cls: cls.name)
def test_prune_help_lists_a_flag_for_every_field(cls, prune_help):
    flags = {flag.field.name: flag.option for flag in method_flags((cls,))}
    wanted = {item.name for item in fields(cls) if item.name != "inner"}  # inner: --method
    assert set(flags) == wanted
    for name, option in flags.items():
        assert f"{option} " in prune_help, (name, option)
    assert "--owl " in prune_help


def _cli_method(monkeypatch, *args: str):
    """The method config ``sdsprune prune`` hands to prune() for these arguments."""
    from sdsprune.cli import app

    prune_module = importlib.import_module("sdsprune.prune")  # the package exports prune()

    seen = []

    def capture(model, method, **options):
        seen.append(method)
        raise SystemExit(0)

    monkeypatch.setattr(prune_module, "prune", capture)
    result = CliRunner().invoke(app, ["prune", "tiny", *args])
    assert result.exit_code == 0 and seen, result.output
    return seen[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], SparseGPT()),
        (["--method", "wanda", "--mu", "0.5"], Wanda()),  # SDS's flags: no SDS, no effect
        (["--method", "sds", "--base", "wanda", "--mu", "0.5"], SDS(base=Wanda(), mu=0.5)),
        (["--method", "sds", "--no-residual-start"], SDS(residual_start=False)),
        (["--method", "sds[mu=0.3]", "--mu", "0.5"], SDS(mu=0.3)),  # the string wins
        (["--method", "sds:admm", "--admm-rho", "2"], SDS(base=ADMM(rho=2.0))),
        (
            ["--method", "dsnot[initial=sparsegpt]", "--dsnot-max-cycles", "5"],
            DSnoT(initial="sparsegpt", max_cycles=5),
        ),
        (["--owl", "--owl-lambda", "0.05"], OWL(inner=SparseGPT(), lam=0.05)),
        (["--method", "sds", "--block-epochs", "1", "--owl"], OWL(inner=SDS(block_epochs=1))),
    ],
)
def test_cli_flags_and_method_string_give_one_config(monkeypatch, args, expected):
    assert _cli_method(monkeypatch, *args) == expected


def test_cli_refuses_a_bad_method_in_one_line(monkeypatch, capsys):
    from sdsprune.cli import main

    monkeypatch.setattr(sys, "argv", ["sdsprune", "prune", "tiny", "--method", "sds:lasso"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.strip().startswith("error: unknown SDS base 'lasso'") and err.count("\n") == 1


def _options_of_a_call(monkeypatch, *args, **kwargs):
    """The checked options a prune() call hands on (nothing is loaded or pruned)."""
    prune_module = importlib.import_module("sdsprune.prune")
    seen = []
    monkeypatch.setattr(prune_module, "_prune", lambda model, options, *rest: seen.append(options))
    prune_module.prune("tiny", *args, **kwargs)
    return seen[0]


def test_method_strings_and_configs_reach_prune_alike(monkeypatch):
    by_string = _options_of_a_call(monkeypatch, "sds:wanda+owl")
    by_config = _options_of_a_call(monkeypatch, OWL(inner=SDS(base=Wanda())))
    assert by_string.method == by_config.method == OWL(inner=SDS(base=Wanda()))


def test_flat_keywords_of_earlier_releases_map_onto_the_typed_options(monkeypatch):
    from sdsprune.options import Calibration, RunOptions
    from sdsprune.owl import OWLConfig
    from sdsprune.sds import SDSConfig

    with pytest.warns(DeprecationWarning, match="flat keywords"):
        options = _options_of_a_call(
            monkeypatch,
            method="sds",
            base="wanda",
            sds=SDSConfig(mu=0.5),
            owl=OWLConfig(lam=0.05),
            calib="news",
            nsamples=4,
            device="cpu",
            progress=False,
        )
    assert options.method == OWL(inner=SDS(base=Wanda(), mu=0.5), lam=0.05)
    assert options.calibration == Calibration(corpus="news", nsamples=4)
    assert options.run == RunOptions(device="cpu", progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'speed'"):
        _options_of_a_call(monkeypatch, "wanda", speed=11)
    refused = pytest.raises(SdspruneError, match="--base applies to --method sds only")
    with refused, pytest.warns(DeprecationWarning):
        _options_of_a_call(monkeypatch, "wanda", base="magnitude")
