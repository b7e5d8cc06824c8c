"""What each layer may import (issue 14, "Dependencies" and "Files that do one job").

- The NumPy reference (``lora_da_ref`` outside ``lora_da_ref.torch`` and its torch tools) and
  ``proofs_check`` import without torch, matplotlib, hypothesis or pytest installed.
- The torch path (``lora_da_ref.torch`` and the torch tools: the CLI, data, validation, the real
  model) imports without matplotlib, hypothesis or pytest: those are extras (``figs``, ``test``).

- No file imports a private module of ``lora_da_ref`` (a ``_name`` module) from outside the
  package that holds it: shared helpers are public (``lora_da_ref.linalg``, ``lora_da_ref.checks``).

Each import check runs in a fresh interpreter whose ``sys.meta_path`` refuses the blocked packages, as if
they were not installed, then asserts that none of them was loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("matplotlib", "hypothesis", "pytest", "_pytest")
# Top-level modules of lora_da_ref that are torch tools (they may import torch).
TORCH_TOOLS = {"__main__", "cli", "data", "real", "validate"}

_BLOCKER = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
for module in sys.argv[2].split(","):
    importlib.import_module(module)
loaded = sorted(n for n in sys.modules if n.split(".")[0] in blocked)
assert not loaded, f"loaded although blocked: {loaded}"
"""


def _modules(package: str, *, skip: set[str] = frozenset()) -> list[str]:
    """Dotted names of every module of ``package`` (from the files; nothing is imported here)."""
    base = ROOT / package.replace(".", "/")
    names = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts and parts[0] in skip:
            continue
        names.append(".".join([package, *parts]))
    return names


def _import_blocked(modules: list[str], blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER, ",".join(blocked), ",".join(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_numpy_reference_imports_without_torch_or_extras():
    modules = _modules("lora_da_ref", skip={"torch", *TORCH_TOOLS}) + _modules("proofs_check")
    assert "lora_da_ref.synthetic" in modules and "lora_da_ref" in modules
    done = _import_blocked(modules, ("torch", *EXTRAS))
    assert done.returncode == 0, done.stderr[-3000:]


def test_torch_path_imports_without_extras():
    tools = [f"lora_da_ref.{name}" for name in sorted(TORCH_TOOLS)]
    tools = [m for m in tools if (ROOT / (m.replace(".", "/") + ".py")).exists()]
    modules = _modules("lora_da_ref.torch") + tools
    done = _import_blocked(modules, EXTRAS)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("blocked", [("torch",), ("matplotlib",)])
def test_the_blocker_blocks(blocked):
    """The check itself can fail: importing a blocked package directly is refused."""
    done = _import_blocked(["lora_da_ref", *blocked], blocked)
    assert done.returncode != 0
    assert "blocked by the test" in done.stderr


def _private_module_imports(path: Path) -> list[str]:
    """Private ``lora_da_ref`` modules that ``path`` imports from outside their package."""
    importer = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "lora_da_ref":
                continue
            for i, part in enumerate(parts):
                module = ROOT.joinpath(*parts[: i + 1])
                is_module = module.with_suffix(".py").exists() or module.is_dir()
                if part.startswith("_") and not part.startswith("__") and is_module:
                    if ".".join(parts[:i]) != importer:
                        found.append(name)
                    break
    return found


def test_no_private_module_is_used_across_packages():
    offenders = {}
    for top in ("lora_da_ref", "proofs_check", "paper_figs", "benchmarks", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if bad := _private_module_imports(path):
                offenders[str(path.relative_to(ROOT))] = sorted(set(bad))
    assert not offenders, f"private lora_da_ref modules imported across packages: {offenders}"
