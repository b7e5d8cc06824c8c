"""The command lines' cheap checks: each bad input is one line naming the file, line and cause,
exit status 2, and it is reported before torch is imported; ``--help`` of every command line
imports no torch. Runs in subprocesses (the test process itself may have imported torch)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")


def _run_main(module: str, argv: list[str]) -> tuple[int, list[str], str]:
    """(exit status, heavy modules imported, stderr) of ``module.main(argv)`` in a fresh process."""
    code = (
        f"import sys\nfrom {module} import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    rc, heavy = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(rc), eval(heavy), proc.stderr


@pytest.fixture
def files(tmp_path):
    """A stand-in model directory (a config.json is all the cheap checks look at) and data."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    return tmp_path


BAD_DATA = {  # id: (file bytes, expected message after the path)
    "non-utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r":2: byte offset 28: not UTF-8 \(byte 0xe9"),
    "malformed-json": (b'{"text": "ok"}\n{"text": "a",, "b": 1}\n', r":2:14: invalid JSON \(Expecting property name"),
    "missing-field": (b'{"text": "ok"}\n{"body": "x"}\n', r":2: missing field 'text' \(keys present: body\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_is_one_line_with_file_line_and_cause_before_torch(files, case):
    content, message = BAD_DATA[case]
    data = files / "bad.jsonl"
    data.write_bytes(content)
    for command in (["init", "--out", str(files / "out")], ["plan"]):
        argv = [*command, "--model", str(files / "model"), "--data", str(data)]
        rc, heavy, err = _run_main("lora_da_ref.cli.main", argv)
        assert rc == 2 and heavy == [], (rc, heavy, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"lora-da {command[0]}: error: {data}")
        assert re.search(message, lines[0]), lines[0]


BAD_ARGS = {  # id: (extra argv, expected message); the data and model are fine
    "data-is-a-directory": (["--data", "."], r"\.: is a directory, not a JSONL file"),
    "data-missing": (["--data", "nope.jsonl"], "calibration data file not found: nope.jsonl"),
    "rank": (["--rank", "0"], "--rank must be >= 1, got 0"),
    "samples": (["--samples", "0"], "--samples must be >= 1"),
    "max-length": (["--max-length", "1"], "--max-length must be >= 2"),
    "batch-size": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "damping": (["--damping", "-1"], "--damping must be a finite number >= 0"),
    "damping-scale": (["--damping-scale", "absolute"], "--damping-scale needs --damping"),
    "layers-per-pass": (["--layers-per-pass", "0"], "--layers-per-pass must be >= 1"),
    "budget": (["--max-statistics-bytes", "8Q"], "--max-statistics-bytes '8Q': give auto"),
    "n-train": (["--n-train", "0"], "--n-train must be positive"),
    "device": (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    "model-without-config": (["--model", "."], "not a local Hugging Face model directory"),
    "out-is-a-file": (["--out", "good.jsonl"], "--out good.jsonl: is a file"),
    "half-a-pair": (["--prompt-field", "q"], "give both --prompt-field and --completion-field"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_argument_is_one_line_before_torch(files, monkeypatch, case):
    extra, message = BAD_ARGS[case]
    monkeypatch.chdir(files)
    argv = ["init", "--model", "model", "--data", "good.jsonl", "--out", "out", *extra]
    code = (
        "import sys\nfrom lora_da_ref.cli.main import main\n"
        f"rc = main({argv!r})\nprint(rc, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=files, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )  # fmt: skip
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-da init: error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["--preset", "official"], "--preset is an option of a subcommand; put it after one: "
                                   "lora-da init --preset ... or lora-da plan --preset ..."),
        (["report", "adapter", "--rank", "4"], "--rank is not an option of report; it belongs to "
                                               "lora-da init --rank ..."),
    ],
    ids=["before-the-subcommand", "wrong-subcommand"],
)  # fmt: skip
def test_misplaced_option_gets_a_hint(argv, hint):
    rc, heavy, err = _run_main("lora_da_ref.cli.main", argv)
    assert rc == 2 and heavy == []
    assert len(err.strip().splitlines()) == 1 and hint in err, err


def test_config_is_an_alias_of_preset_and_version_answers():
    from lora_da_ref.cli.main import build_parser

    base = ["init", "--model", "m", "--data", "d", "--out", "o"]
    parser = build_parser("init")
    assert parser.parse_args([*base, "--config", "official"]).preset == "official"
    assert parser.parse_args([*base, "--preset", "paper_literal"]).preset == "paper_literal"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_da_ref", "--version"], capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("lora-da "), proc


def test_size_parser():
    from lora_da_ref.cli.checks import parse_size

    assert parse_size("auto") == "auto" and parse_size("None") is None
    assert parse_size("500M") == 500 * 2**20 and parse_size("8G") == 8 * 2**30
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("123") == 123
    for bad in ("8Q", "-1G", "0", "G"):
        with pytest.raises(ValueError, match="max-statistics-bytes"):
            parse_size(bad)


@pytest.mark.parametrize(
    "module", ["lora_da_ref.cli.validate", "paper_figs.__main__"], ids=["validate", "paper_figs"]
)
def test_other_command_lines_help_imports_no_torch(module):
    rc, heavy, err = _run_main(module, ["--help"])
    assert rc == 0 and heavy == [], (heavy, err)


def test_paper_figs_help_lists_every_item_in_plain_words():
    proc = subprocess.run(
        [sys.executable, "-m", "paper_figs", "--help"], capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )  # fmt: skip
    from paper_figs.__main__ import EXTRA_ITEMS, ITEMS

    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.split("items:")[1].splitlines() if line}
    assert listed == {*ITEMS, *EXTRA_ITEMS, "all"} and "fig2_lr" in listed
    assert "`" not in proc.stdout and "issue" not in proc.stdout
    assert "(default: False)" in proc.stdout  # --quick shows its default


def test_validate_arguments_match_the_torch_constants():
    """The torch-free parser repeats the torch modules' choices and defaults (it is declared
    before torch loads): they must agree with BUILTIN_CASES, DEFAULT_RANK, METHODS, PARTS and
    SmolLM2Options."""
    from lora_da_ref.cli import validate_args as v
    from lora_da_ref.torch.validation.cases import BUILTIN_CASES
    from lora_da_ref.torch.validation.compare import DEFAULT_RANK, METHODS
    from lora_da_ref.torch.validation.smollm2 import PARTS, SmolLM2Options

    assert set(v.BUILTIN_CASES) == set(BUILTIN_CASES) and v.DEFAULT_RANK == DEFAULT_RANK
    assert set(v.METHODS) == set(METHODS) and tuple(v.PARTS) == tuple(PARTS)
    for name, value in v.SMOLLM2.items():
        assert getattr(SmolLM2Options, name) == value, name
    defaults = {a.dest: a.default for a in v.build_parser()._actions}
    assert defaults["texts"] == SmolLM2Options.texts
    assert defaults["layers_per_pass"] == SmolLM2Options.layers_per_pass
