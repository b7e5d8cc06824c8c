"""One version: ``lora_da_ref.__version__``, which the command line and the installed metadata
read (a second literal in pyproject.toml or the CLI would drift from it)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

import lora_da_ref
from lora_da_ref.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_line_prints_the_package_version(capsys, monkeypatch):
    monkeypatch.setattr(lora_da_ref, "__version__", "9.9.9-test")
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == "lora-da 9.9.9-test"


def test_pyproject_takes_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "lora_da_ref.__version__"
    assert version("lora_da_ref") == lora_da_ref.__version__
