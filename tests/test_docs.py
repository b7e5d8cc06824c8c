"""The README and ``docs/*.md`` work when copied: every Python block runs, every link resolves.

Conventions (also in docs/index.md, "Writing these pages"):

- every ```` ```python ```` block runs, in a fresh namespace, in the page's own temporary working
  directory, in page order; ```` ```python no-run ```` opts out (a ``torchrun`` snippet, say) but
  must still compile;
- a ```` ```bash ```` block is shown, not run, unless marked ```` ```bash run ````: then it runs
  (``bash -euo pipefail``, the installed ``lora-da`` script on PATH) in that directory before the
  blocks after it;
- the README stays under 10 000 characters; every ``docs/*.md`` is on the map (docs/index.md);
  every relative link, and every ``#anchor`` into a page, resolves;
- every equation the code, the tests and the docs cite ("Eq. N", "Eqs. N–M") has a heading in
  docs/equations.md, and every section of it cited by name exists.
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


# Pages whose blocks take long: docs/peft.md 42-46 s on the shared, loaded 2-core machine (31 s of
# CPU). Their blocks run with ``-m slow``; their links are checked by default.
SLOW_PAGES = {"docs/peft.md"}
CODE_PAGES = [
    pytest.param(p, marks=pytest.mark.slow) if _rel(p) in SLOW_PAGES else p for p in PAGES
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", CODE_PAGES, ids=_rel)
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


# A citation of the paper's equations: "Eq. 17", "Eq. (19)", "Eqs. (5)–(8)", "Eqs. 16, 21",
# "Eqs. (14)–(16) and (21)", "Eq. (11)/(19)". A number glued to a letter ("11b") is not one.
_EQ_ITEM = r"\(?\d+\)?(?!\w)"
EQ_CITATION = re.compile(rf"\bEqs?\.\s*{_EQ_ITEM}(?:\s*(?:[–-]|,|/|and)\s*{_EQ_ITEM})*")
EQ_HEADING = re.compile(r"^#{2,6} (Eqs?\. [^:\n]+)", re.M)
EQ_RANGE = re.compile(r"(\d+)\)?\s*[–-]\s*\(?(\d+)")
# Sections of docs/equations.md cited by name: (docs/equations.md, "Official code").
SECTION_CITATION = re.compile(r"docs/equations\.md,?\s+\"([^\"]+)\"")
CITING_DIRS = ("lora_da_ref", "proofs_check", "paper_figs", "benchmarks", "tests")


def _citing_files() -> list[Path]:
    files = [p for d in CITING_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    return files + [p for p in PAGES if p.name != "equations.md"]


def _equations_defined(text: str) -> set[int]:
    """The equation numbers that have a heading in ``text``: "Eqs. (5)–(8)" defines 5, 6, 7, 8."""
    numbers: set[int] = set()
    for label in EQ_HEADING.findall(text):
        numbers.update(int(n) for n in re.findall(r"\d+", label))
        for lo, hi in EQ_RANGE.findall(label):
            numbers.update(range(int(lo), int(hi) + 1))
    return numbers


def _equations_cited(text: str) -> set[int]:
    """The equation numbers ``text`` cites; a cited range "(16)–(21)" needs its two ends only."""
    return {int(n) for cite in EQ_CITATION.findall(text) for n in re.findall(r"\d+", cite)}


def test_every_cited_equation_is_in_equations_md():
    """Every "Eq. N" / "Eqs. N–M" of the code, the tests and the docs has its formula in
    docs/equations.md, under a heading that names N; every section cited by name exists."""
    equations = (DOCS / "equations.md").read_text()
    defined = _equations_defined(equations)
    headings = {
        h.strip() for h in re.findall(r"^#{1,6} (.+)$", _prose(DOCS / "equations.md"), re.M)
    }
    assert {5, 6, 7, 8, 13, 16, 17, 19, 21, 22, 48} <= defined  # the parser reads the headings
    missing = []
    for path in _citing_files():
        text = path.read_text()
        missing += [f"{_rel(path)}: Eq. {n}" for n in sorted(_equations_cited(text) - defined)]
        for section in SECTION_CITATION.findall(text):
            if " ".join(section.split()) not in headings:
                missing.append(f'{_rel(path)}: section "{section}"')
    assert not missing, f"cited but not in docs/equations.md: {missing}"


def test_equation_citation_parser():
    assert _equations_cited("Eqs. (14)–(16) and (21); Eq. 17) and Eq. (11)/(19)") == {
        11, 14, 16, 17, 19, 21,
    }  # fmt: skip
    assert _equations_cited("rows 11a (Eq. 22) and 11b") == {22}
    assert _equations_defined("#### Eqs. (27), (28)–(31): x\n## Eq. 4\n") == {4, 27, 28, 29, 30, 31}


def test_the_readme_docs_table_lists_every_page():
    """Every page in docs/ has a row in the README's documentation table (a new page without
    one is invisible from the front door)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Documentation") :]
    rows = set(re.findall(r"^\| \[docs/([\w.]+\.md)\]", table, flags=re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}  # the map, above it
    assert "[docs/index.md](docs/index.md)" in table
    assert pages - rows == set(), f"pages missing from the README's docs table: {pages - rows}"
