"""The README and ``docs/*.md`` work when copied: every Python block runs, every link resolves.

Conventions (also in docs/index.md, "Writing these pages"):

- every ```` ```python ```` block runs, in a fresh namespace, in the page's own temporary working
  directory, in page order; ```` ```python no-run ```` opts out (a ``torchrun`` snippet, say) but
  must still compile;
- a ```` ```bash ```` block is shown, not run, unless marked ```` ```bash run ````: then it runs
  (``bash -euo pipefail``, the installed ``lora-da`` script on PATH) in that directory before the
  blocks after it;
- the README stays under 10 000 characters; every ``docs/*.md`` is on the map (docs/index.md);
  every relative link, and every ``#anchor`` into a page, resolves.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
README_LIMIT = 10_000

# ```lang flags\n body ``` at the start of a line (no nesting in these pages).
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
KNOWN = {("python", ""), ("python", "no-run"), ("bash", ""), ("bash", "run")}


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, flags, code) of every fenced block of ``page``, in order."""
    out = []
    for info, code in FENCE.findall(page.read_text()):
        lang, _, flags = info.strip().partition(" ")
        out.append((lang, flags.strip(), code))
    return out


def _prose(page: Path) -> str:
    """The page without its fenced blocks (links and headings inside code do not count)."""
    return FENCE.sub("", page.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(page), re.M)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = _blocks(page)
    for lang, flags in {(lang, flags) for lang, flags, _ in blocks}:
        if lang in ("python", "bash"):
            assert (lang, flags) in KNOWN, f"{_rel(page)}: unknown fence ```{lang} {flags}"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    monkeypatch.chdir(tmp_path)
    for i, (lang, flags, code) in enumerate(blocks):
        name = f"{_rel(page)}[block {i}]"
        if lang == "python":
            compiled = compile(code, name, "exec")
            if flags != "no-run":
                exec(compiled, {"__name__": "__main__"})
        elif lang == "bash" and flags == "run":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, f"{name} failed:\n{code}\n{done.stderr[-3000:]}"


def test_readme_is_short():
    size = len((ROOT / "README.md").read_text())
    assert size < README_LIMIT, f"README.md has {size} characters (limit {README_LIMIT})"


def test_readme_python_example_exists():
    """The README keeps its runnable PEFT example (run by ``test_code_blocks_run``)."""
    runnable = [
        c for lang, flags, c in _blocks(ROOT / "README.md") if lang == "python" and not flags
    ]
    assert any("apply_lora_da" in c or "initialize_lora_da_weights" in c for c in runnable)


def test_every_docs_page_is_on_the_map():
    linked = {
        (DOCS / target.split("#")[0]).resolve()
        for target in LINK.findall(_prose(DOCS / "index.md"))
        if target.split("#")[0].endswith(".md")
    }
    missing = [_rel(p) for p in DOCS.glob("*.md") if p.name != "index.md" and p not in linked]
    assert not missing, f"pages not linked from docs/index.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{_rel(page)}: broken links {broken}"


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and fetch the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_equation_table_names_resolve():
    """docs/equations.md: every function named imports, every test file named exists."""
    rows = [
        line.split("|")[1:-1]
        for line in (DOCS / "equations.md").read_text().splitlines()
        if line.startswith("| ") and "`" in line
    ]
    assert len(rows) >= 15
    missing = []
    for _, code, tests in rows:
        last = None
        for name in re.findall(r"`([^`]+)`", code):
            if name.startswith("lora_da_ref"):
                last = name
                target = name
            elif re.fullmatch(r"\w+", name) and last is not None:
                target = f"{last}.{name}"
            else:
                continue
            try:
                _resolve(target)
            except (ImportError, AttributeError) as err:
                missing.append(f"{target} ({err})")
        for path in re.findall(r"`(tests/[^`]+)`", tests):
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"docs/equations.md names what does not exist: {missing}"
