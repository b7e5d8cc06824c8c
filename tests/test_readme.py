"""README and CI agree: `.ci/run` runs exactly the README's set-up commands, in the README's order:
the install, the default tests (slow ones deselected by pyproject's addopts) and the slow tests.

(The README's Python blocks, like those of ``docs/*.md``, are run by ``tests/test_docs.py``.)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    """The commands `.ci/run` executes, `run_tests ` (its exit-code wrapper) stripped."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip().removeprefix("run_tests ") for line in lines]


def test_readme_setup_is_install_default_tests_then_slow_tests():
    assert _setup_commands() == [
        "python -m pip install --no-deps -r requirements-lock.txt",
        "python -m pytest -q",
        "python -m pytest -q -m slow",
    ]
    # the default run leaves the slow tests out; `-m slow` on the command line replaces this
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^addopts = ".*-m \\"not slow\\""$', pyproject, re.M), (
        "slow tests not deselected"
    )


def test_ci_runs_the_readme_commands_in_order():
    commands, ci = _setup_commands(), _ci_commands()
    for command in commands:
        assert command in ci, f".ci/run does not run the README command {command!r}"
    assert [ci.index(command) for command in commands] == sorted(
        ci.index(command) for command in commands
    ), "README and .ci/run order the commands differently"
    pytest_lines = [line for line in ci if line.startswith("python -m pytest")]
    assert pytest_lines == [c for c in commands if c.startswith("python -m pytest")], pytest_lines
