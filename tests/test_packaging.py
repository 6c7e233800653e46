"""Packaging metadata: what every install reads."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_string_not_the_deprecated_table():
    """setuptools >= 77 prints a deprecation block on every install for ``{text = ...}``."""
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    requirement = data["build-system"]["requires"][0]
    assert requirement.startswith("setuptools>=")
    assert int(requirement.removeprefix("setuptools>=").split(".")[0]) >= 77
