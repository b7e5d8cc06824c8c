"""The ``lora-da`` CLI end to end on a tiny offline LLaMA, and its error messages."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_da_ref.cli.main import SUBCOMMANDS, build_parser, main
from lora_da_ref.data import TINY_TEXTS, tokenize_batches
from lora_da_ref.torch import LoraDAConfig, find_target_modules, init_lora_da
from lora_da_ref.torch.adapter import lora_modules
from tests.report import allclose_report

# PEFT 0.21 calls a transformers-5 deprecated property on every wrap; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

RANK = 4
MAX_LENGTH = 24
N_LAYERS = 2
EPS32 = torch.finfo(torch.float32).eps
# As in test_torch_adapter: ≈ 7 linear maps per decoder layer × √d ≈ 8 × 2 (softmax/norm) eps,
# relative to the logit scale times (1 + κ), κ = max|s·A0B0| / max|W0| (the cancellation in
# (W0 − sA0B0)x + sA0B0x loses κ times more).
SUBTRACT_RTOL_PER_LAYER = 100


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["make-tiny-model", str(root / "model"), "--layers", str(N_LAYERS)]) == 0
    data = root / "calib.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TINY_TEXTS))
    )
    return root


def _init(workspace, out, *extra) -> int:
    argv = ["init", "--model", str(workspace / "model"), "--data", str(workspace / "calib.jsonl")]
    argv += [
        "--rank",
        str(RANK),
        "--out",
        str(out),
        "--max-length",
        str(MAX_LENGTH),
        "--no-progress",
    ]
    return main([*argv, *extra])


def _expected_factors(workspace, config: LoraDAConfig):
    """What the CLI should compute, via the library API on a freshly loaded model."""
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    batches = tokenize_batches(tok, list(TINY_TEXTS), max_length=MAX_LENGTH, batch_size=1)
    return init_lora_da(model, batches, config, progress=False)


@pytest.mark.parametrize(
    ("preset", "scaling"),
    [("default", 16 / math.sqrt(RANK)), ("official", 16 / math.sqrt(RANK)), ("paper_literal", 1.0)],
)
def test_init_writes_adapter_that_peft_loads_with_the_factors(workspace, tmp_path, preset, scaling):
    out = tmp_path / "adapter"
    assert _init(workspace, out, "--config", preset) == 0
    config = LoraDAConfig.preset(preset, rank=RANK, seed=0)
    factors = _expected_factors(workspace, config)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    layers = lora_modules(PeftModel.from_pretrained(base, out))
    assert sorted(layers) == sorted(factors)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, factors[name].A.T), name
        assert torch.equal(layer.lora_B["default"].weight, factors[name].B.T), name
        assert layer.scaling["default"] == pytest.approx(scaling)
    meta = json.loads((out / "lora_da.json").read_text())
    assert meta["preset"] == preset and meta["offset"] == "none"
    assert meta["data"]["texts"] == len(TINY_TEXTS)
    assert sorted(meta["layers"]) == sorted(factors)


@pytest.fixture(scope="module")
def subtract_adapter(workspace):
    out = workspace / "adapter-subtract"
    assert _init(workspace, out, "--offset", "subtract") == 0
    return out


X = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def _subtract_tol(peft_model, original, logits) -> float:
    kappa = _offset_ratio(peft_model, original)
    return SUBTRACT_RTOL_PER_LAYER * N_LAYERS * EPS32 * (1 + kappa) * float(logits.abs().max())


def test_init_subtract_saves_offset_base_model_and_keeps_logits(workspace, subtract_adapter):
    out = subtract_adapter
    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    offset_base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(offset_base, out)
    with torch.no_grad():
        want, got = original(X).logits, model(X).logits
        auto = AutoPeftModelForCausalLM.from_pretrained(out)(X).logits  # base path in the config
    tol = _subtract_tol(model, original, want)
    allclose_report(got, want, rtol=0.0, atol=tol, name="logits with offset base + adapter")
    assert torch.equal(auto, got)
    # A check that can fail: the adapter on the *original* base does change the logits.
    with torch.no_grad():
        moved = PeftModel.from_pretrained(original, out)(X).logits
    assert (moved - want).abs().max() > 100 * tol


def test_subtract_adapter_converts_to_plain_lora_on_original_base(
    workspace, subtract_adapter, tmp_path
):
    """README recipe: after training on the offset base, PEFT's initial-model conversion gives a
    rank-2r adapter for the *original* base with the same function."""
    base = AutoModelForCausalLM.from_pretrained(subtract_adapter / "base_model")
    model = PeftModel.from_pretrained(base, subtract_adapter, is_trainable=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every LoRA weight
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        want = model(X).logits
    init_copy = tmp_path / "initial"  # PEFT rewrites the initial adapter's config: use a copy
    shutil.copytree(subtract_adapter, init_copy, ignore=shutil.ignore_patterns("base_model"))
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(init_copy)
    )
    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tol = _subtract_tol(model, original, want)
    converted = PeftModel.from_pretrained(original, tmp_path / "converted")  # wraps in place
    assert converted.peft_config["default"].r == 2 * RANK
    with torch.no_grad():
        got = converted(X).logits
    allclose_report(got, want, rtol=0.0, atol=tol, name="converted adapter on the original base")


def _offset_ratio(peft_model, original) -> float:
    weights = dict(original.named_parameters())
    ratios = []
    for name, layer in lora_modules(peft_model).items():
        sab = (
            layer.scaling["default"]
            * layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
        )
        ratios.append(
            float(sab.detach().abs().max() / weights[f"{name}.weight"].detach().abs().max())
        )
    return max(ratios)


def test_target_modules_text_field_batch_size_and_bf16_model(workspace, tmp_path):
    data = tmp_path / "other.jsonl"
    data.write_text('{"content": "hello there"}\n\n{"content": "a second text, longer"}\n')
    out = tmp_path / "adapter"
    argv = ["init", "--model", str(workspace / "model"), "--data", str(data), "--out", str(out)]
    argv += ["--rank", "2", "--text-field", "content", "--batch-size", "2", "--no-progress"]
    argv += [
        "--target-modules",
        "q_proj",
        "v_proj",
        "--dtype",
        "float64",
        "--model-dtype",
        "bfloat16",
    ]
    assert main(argv) == 0
    meta = json.loads((out / "lora_da.json").read_text())
    assert meta["data"]["file"] == str(data) and meta["data"]["text_field"] == "content"
    assert meta["data"]["texts"] == 2 and meta["data"]["batches"] == 1
    assert meta["config"]["dtype"] == "float64"
    assert {n.rsplit(".", 1)[-1] for n in meta["layers"]} == {"q_proj", "v_proj"}
    layers = lora_modules(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), out)
    )
    assert len(layers) == 2 * N_LAYERS and all(l.r["default"] == 2 for l in layers.values())


# ----------------------------------------------------------------------------- bad inputs


def _bad(workspace, tmp_path, capsys, jsonl: str | None, *extra) -> str:
    data = workspace / "calib.jsonl"
    if jsonl is not None:
        data = tmp_path / "bad.jsonl"
        data.write_text(jsonl)
    out = tmp_path / "adapter"
    argv = ["init", "--model", str(workspace / "model"), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--rank", str(RANK), "--no-progress", *extra]) == 2
    assert not out.exists(), "nothing may be written on error"
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("jsonl", "extra", "message"),
    [
        ('{"text": "ok"}\n{"body": "no text here"}\n', (), r"bad.jsonl:2: missing field 'text'"),
        ("", (), "no JSON records"),
        ("\n  \n", (), "no JSON records"),
        ('{"text": "ok"}\nnot json\n', (), r"bad.jsonl:2:1: invalid JSON \(Expecting value\)"),
        ('{"text": 3}\n', (), "must be a string"),
        ('["text"]\n', (), "expected a JSON object"),
        ('{"text": ""}\n', (), "2 or more tokens"),
        (None, ("--rank", "1000"), "rank"),
        (None, ("--rank", "0"), "rank"),
        (None, ("--target-modules", "nonexistent_proj"), "nonexistent_proj"),
        (None, ("--n-train", "0"), "--n-train must be positive"),
    ],
    ids=[
        "missing-field", "empty", "blank", "invalid-json", "non-string", "not-object",
        "no-tokens", "rank-too-large", "rank-zero", "unknown-target", "n-train",
    ],
)  # fmt: skip
def test_bad_input_gives_one_clear_error(workspace, tmp_path, capsys, jsonl, extra, message):
    err = _bad(workspace, tmp_path, capsys, jsonl, *extra)
    assert err.startswith("lora-da init: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_missing_files_are_reported(workspace, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = ["init", "--model", str(workspace / "model"), "--data", str(tmp_path / "nope.jsonl")]
    assert main([*argv, "--out", str(out)]) == 2
    assert "calibration data file not found" in capsys.readouterr().err
    argv = ["init", "--model", str(tmp_path), "--data", str(workspace / "calib.jsonl")]
    assert main([*argv, "--out", str(out)]) == 2
    assert "not a local Hugging Face model directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- wiring


def test_every_subcommand_is_registered_in_the_parser():
    parser = build_parser()
    argv = {
        "init": ["--model", "m", "--data", "d", "--out", "o"],
        "make-tiny-model": ["dir"],
        "plan": ["--model", "m", "--data", "d"],
        "report": ["adapter"],
        "gsm8k-data": ["--out", "calib.jsonl"],
    }
    for name in SUBCOMMANDS:
        assert parser.parse_args([name, *argv.get(name, [])]).command == name


def test_python_dash_m_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "lora_da_ref", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


# ----------------------------------------------------------------------------- help

OWN_SUBCOMMANDS = (
    "init", "plan", "report", "real-model", "gsm8k-data", "make-tiny-model", "validate",
)  # fmt: skip


def _subparser(name: str):
    parser = build_parser(name)
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("name", OWN_SUBCOMMANDS)
def test_every_option_has_help_that_shows_its_default(name):
    sub = _subparser(name)
    text = " ".join(sub.format_help().split())
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        if action.default is not None:
            assert f"(default: {action.default})" in text, (name, action.option_strings[0])


@pytest.mark.parametrize("argv", [["--help"], *[[n, "--help"] for n in OWN_SUBCOMMANDS]])
def test_help_imports_no_torch(argv):
    """Heavy imports come after argument parsing, so --help answers at once (deterministic
    check: torch, transformers and peft are not imported)."""
    code = (
        "import sys\nfrom lora_da_ref.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", r"--device 'gpu' is not a torch device"), ("cuda", "CPU-only build")],
)
def test_bad_device_is_one_line_before_anything_is_loaded(
    workspace, tmp_path, capsys, monkeypatch, device, message
):
    import lora_da_ref.cli.main as cli

    monkeypatch.setattr(torch.version, "cuda", None)  # as a CPU-only build of torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the device was checked")

    monkeypatch.setattr(cli, "_load_model", must_not_load)
    monkeypatch.setattr(cli, "_load_tokenizer", must_not_load)
    argv = ["init", "--model", str(workspace / "model"), "--data", str(workspace / "calib.jsonl")]
    assert main([*argv, "--out", str(tmp_path / "a"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_adapter_config_is_causal_lm_with_an_absolute_base_path(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(workspace)
    out = tmp_path / "adapter"
    argv = ["init", "--model", "model", "--data", "calib.jsonl", "--out", str(out)]
    assert main([*argv, "--rank", str(RANK), "--max-length", str(MAX_LENGTH), "--no-progress"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str((workspace / "model").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(out)(X).logits
        base = AutoModelForCausalLM.from_pretrained(workspace / "model")
        want = PeftModel.from_pretrained(base, out)(X).logits
    assert torch.equal(auto, want)


PAIRS = [
    ("Question: what is 2+2? Answer:", " 4, since two and two make four."),
    ("Translate 'chat' to English:", " cat"),
    ("The quick brown fox", " jumps over the lazy dog."),
]


def test_prompt_completion_labels_mask_the_prompt():
    from lora_da_ref.data import IGNORE_INDEX, tokenize_prompt_completion
    from tests.tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    batches = tokenize_prompt_completion(tok, PAIRS, max_length=64, batch_size=3)
    (batch,) = batches
    for row, (prompt, completion) in enumerate(PAIRS):
        n_prompt = len(tok(prompt)["input_ids"])
        n_all = n_prompt + len(tok(completion, add_special_tokens=False)["input_ids"])
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt:n_all], ids[n_prompt:n_all])
        assert (labels[n_all:] == IGNORE_INDEX).all() and not batch["attention_mask"][
            row, n_all:
        ].any()
    with pytest.raises(ValueError, match="keeps a completion token"):
        tokenize_prompt_completion(tok, [("a long prompt here", " x")], max_length=3)


def test_cli_prompt_completion_fields(workspace, tmp_path):
    from lora_da_ref.data import tokenize_prompt_completion

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"q": p, "a": c}) + "\n" for p, c in PAIRS))
    out = tmp_path / "adapter"
    argv = ["init", "--model", str(workspace / "model"), "--data", str(data), "--out", str(out)]
    argv += ["--rank", "2", "--config", "paper_literal", "--max-length", "64", "--no-progress"]
    assert main([*argv, "--prompt-field", "q", "--completion-field", "a"]) == 0
    meta = json.loads((out / "lora_da.json").read_text())
    assert meta["data"]["prompt_field"] == "q" and meta["data"]["completion_field"] == "a"
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    config = LoraDAConfig.paper_literal(rank=2)
    masked = tokenize_prompt_completion(tok, PAIRS, max_length=64)
    want = init_lora_da(model, masked, config, progress=False)
    unmasked = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
                for b in masked]  # fmt: skip
    other = init_lora_da(model, unmasked, config, progress=False)
    layers = lora_modules(PeftModel.from_pretrained(model, out))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(layers[name].lora_B["default"].weight, want[name].B.T)
    assert not torch.equal(want[name].B, other[name].B)  # the mask matters
    assert main([*argv[:-1], "--prompt-field", "q"]) == 2


def test_cli_and_python_paths_give_the_same_adapter_and_provenance(workspace, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_da_ref.torch import initialize_lora_da_weights
    from lora_da_ref.torch.config import DEFAULT_TARGETS

    out = tmp_path / "cli"
    assert _init(workspace, out) == 0
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    batches = tokenize_batches(tok, list(TINY_TEXTS), max_length=MAX_LENGTH)
    lora = LoraConfig(r=RANK, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                      target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")  # fmt: skip
    pm = get_peft_model(model, lora)
    state = initialize_lora_da_weights(pm, batches, LoraDAConfig(rank=RANK), progress=False)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    cli = lora_modules(PeftModel.from_pretrained(base, out))
    for name, layer in lora_modules(pm).items():
        for part in ("lora_A", "lora_B"):
            want = getattr(layer, part)["default"].weight
            assert torch.equal(getattr(cli[name], part)["default"].weight, want), (name, part)
    meta = json.loads((out / "lora_da.json").read_text())
    py = json.loads(json.dumps(state.provenance))
    for key in ("method", "preset", "offset", "config", "peft", "layers", "versions"):
        assert meta[key] == py[key], key
    assert set(meta) == set(py)


# ----------------------------------------------------------------------------- report


def test_report_tables_figure_and_exit_status(workspace, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert _init(workspace, out) == 0
    meta = json.loads((out / "lora_da.json").read_text())
    # 5 tiny texts: the calibration SNR is < 1 (G is noise), which rightly flags; drop the
    # data-size diagnostics for a clean baseline, then break one layer at a time.
    for diag in meta["layers"].values():
        for key in ("calibration_snr", "precision_probe"):
            diag.pop(key, None)
    (out / "lora_da.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"{kind} ({N_LAYERS} layers)" in text
    assert "residual" in text and f"PASS: 0 of {7 * N_LAYERS} layers failed" in text
    assert (out / "lora_da_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "lora_da.json").read_text())
    meta["layers"]["model.layers.1.mlp.down_proj"]["residual"] = 0.5
    meta["layers"]["model.layers.0.self_attn.k_proj"]["cond"] = {"Z": "inf", "Y": 3.0}
    (out / "lora_da.json").write_text(json.dumps(meta))
    assert main(["report", str(out), "--no-figure"]) == 1
    text = capsys.readouterr().out
    assert "FLAGGED model.layers.1.mlp.down_proj: residual 0.5 > 0.001" in text
    assert "FLAGGED model.layers.0.self_attn.k_proj: cond.Z = inf" in text
    assert f"FAIL: 2 of {7 * N_LAYERS} layers failed" in text
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize(
    ("diag", "flagged"),
    [
        ({"residual": 1e-6, "solver": "lobpcg"}, False),
        ({"residual": 2e-3}, True),
        ({"residual": "nan"}, True),
        ({"residual": 1e-9, "fallback": "eigh used: LOBPCG residual 0.1 > tol"}, False),
        ({"warnings": ["cond(Z) 3e9 beyond float32"]}, True),
        ({"trustworthy": False}, True),
        ({"cond_Y": "inf"}, True),
        ({"cond_Y": 1e12}, False),
        ({"snr": 0.4}, True),
        ({"snr": 3.0, "stability": 0.9}, False),
        ({"stability": 0.2}, True),
        ({"precision_probe": 0.007}, True),
        ({"precision_probe": 5e-5, "calibration_snr": 5.0}, False),
        ({"precision_probe": 2e-4, "calibration_snr": 5.0}, True),  # within the draw's spread
        ({"calibration_snr": 0.3}, True),
        ({"calibration_snr": 0.3, "split_snr": 4.0}, False),  # the split-half SNR is the one
        ({"precision_bound": 0.02}, True),
        ({"precision_bound": 0.02, "precision_probe": 1e-5}, False),  # measured: within
    ],
)
def test_flag_rules(diag, flagged):
    from lora_da_ref.cli.report import _flatten, flag_reasons

    assert bool(flag_reasons(_flatten(diag))) is flagged


def test_precision_reasons_name_the_limit_they_were_read_against():
    """A probe that did not clear is shown against its margin's limit, a bound against 1e-3;
    failed layers are listed before unverified ones whatever their decades past the limit."""
    from lora_da_ref.cli.report import LayerRow, _flatten, flag_reasons, format_report

    model = {"precision_bound": 0.02, "precision_probe": 7e-4, "precision_rounding": "model"}
    assert flag_reasons(_flatten(model)) == ["precision_probe 0.0007 rad > 0.0005 (unverified)"]
    measured = {"precision_bound": 0.02, "precision_probe": 9e-4}
    assert flag_reasons(_flatten(measured)) == ["precision_probe 0.0009 rad > 0.0001 (unverified)"]
    assert flag_reasons(_flatten({"precision_bound": 0.02})) == [
        "precision_bound 0.02 rad > 0.001 (unverified)"
    ]
    rows = [
        LayerRow("m.0.x", "x", 0, _flatten(measured)),  # 0.95 decades past its limit
        LayerRow("m.1.x", "x", 1, _flatten({"precision_probe": 1.1e-3})),  # failed by 0.04
    ]
    for r in rows:
        r.reasons = flag_reasons(r.values)
    text = format_report({}, rows)
    assert text.index("FLAGGED m.1.x") < text.index("FLAGGED m.0.x"), text


@pytest.mark.parametrize(
    ("diag", "kinds"),
    [
        ({"residual": 2e-3}, {"failed"}),
        ({"precision_probe": 0.007}, {"failed"}),
        ({"precision_probe": 0.007, "precision_rounding": "measured"}, {"failed"}),
        # the default tier's re-solve at the modelled rounding: not a measurement
        (
            {"precision_bound": 0.02, "precision_probe": 0.007, "precision_rounding": "model"},
            {"unverified"},
        ),
        ({"precision_bound": 0.02, "precision_probe": 2e-4, "precision_rounding": "model"}, set()),
        # below 1e-3 but within the spread of one draw (half the limit at the model's size)
        (
            {"precision_bound": 0.02, "precision_probe": 7e-4, "precision_rounding": "model"},
            {"unverified"},
        ),
        ({"precision_bound": 0.02, "precision_probe": 2e-4}, {"unverified"}),  # measured: 1e-4
        ({"precision_bound": 5e-4, "precision_probe": 2e-4}, set()),  # the bound clears it
        ({"precision_bound": 5e-4, "precision_probe": 2e-3}, {"failed"}),  # a re-solve disagrees
        # numbers as JSON writers leave them: NaN or negative clears nothing, "inf" is a number
        ({"precision_bound": "nan"}, {"unverified"}),
        ({"precision_bound": "-inf"}, {"unverified"}),
        ({"precision_bound": -1e-5}, {"unverified"}),
        (
            {"precision_bound": 0.02, "precision_probe": "nan", "precision_rounding": "model"},
            {"unverified"},
        ),
        ({"precision_probe": "inf"}, {"failed"}),
        ({"precision_probe": "nan"}, {"failed"}),  # the measured re-solve broke
        # only "model" is not a measurement: an unknown rounding can fail
        ({"precision_probe": 5e-3, "precision_rounding": None}, {"failed"}),
        ({"precision_probe": 5e-3, "precision_rounding": "Model"}, {"failed"}),
        ({"precision_bound": 0.007}, {"unverified"}),
        ({"split_snr": 0.2, "precision_bound": 0.007}, {"unverified", "undetermined"}),
        ({"stability": 0.2}, {"undetermined"}),
        ({"residual": 1e-9, "split_snr": 3.0}, set()),
    ],
)
def test_flag_kinds_fail_only_what_is_wrong(diag, kinds):
    """A bound that cannot decide and data that cannot determine are reported, not failed: the
    cheap precision bound is 68x the measured angle at the median, and the SNR forecasts
    stability only loosely (docs/real_regime.md); a measured angle or a bad solve fails."""
    from lora_da_ref.cli.report import LayerRow, _flatten, closing_line, failed, layer_kinds

    assert layer_kinds(_flatten(diag)) == kinds
    rows = [LayerRow("a.0.x", "x", 0, _flatten(diag)), LayerRow("a.1.x", "x", 1, {})]
    assert failed(rows) is ("failed" in kinds)
    line = closing_line(rows)
    assert line.startswith("FAIL" if "failed" in kinds else "PASS")
    assert ("--diagnostics full" in line) is ("unverified" in kinds)
    assert ("more calibration data" in line) is ("undetermined" in kinds)


# ----------------------------------------------------------------------------- plan, warnings


def test_plan_extrapolates_the_probe_snr_as_the_noise_law_says():
    """SNR(S) = (‖ΔŴ‖² − noise_probe)/(noise_probe·|S_probe|/|S|): the signal does not shrink with
    |S|, the noise does. Breaks if the noise is subtracted at the full size instead."""
    from lora_da_ref.cli.plan import size_for_snr, snr_at_size

    signal, noise, size, full = 3.0, 2.0, 8.0, 40.0
    probe_snr = (signal + noise - noise) / noise  # as calibration_snr: delta_sq = signal + noise
    assert snr_at_size(probe_snr, size, full) == pytest.approx(signal / (noise * size / full))
    need = size_for_snr(probe_snr, size)
    assert snr_at_size(probe_snr, size, need) == pytest.approx(1.0)
    assert size_for_snr(-0.5, size) == math.inf  # no signal seen: no size can be predicted
    # nor an SNR at another size: -0.5 scaled by |S| would read as a precise, ever lower SNR
    assert math.isnan(snr_at_size(-0.5, size, full))


def test_plan_on_the_tiny_model(workspace, tmp_path, capsys):
    from lora_da_ref.cli.plan import _units
    from lora_da_ref.torch.memory import statistics_bytes

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS * 8))
    argv = ["plan", "--model", str(workspace / "model"), "--data", str(data)]
    argv += ["--max-length", str(MAX_LENGTH), "--probe-sequences", "8", "--no-progress"]
    assert main([*argv, "--json", "--layers-per-pass", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    targets = find_target_modules(model, list(LoraDAConfig().target_modules))
    per_module = statistics_bytes(targets, LoraDAConfig())
    assert plan["passes"] == [1] * N_LAYERS and plan["targets"] == 7 * N_LAYERS
    assert plan["statistics_bytes"] == sum(b.total for b in per_module.values())
    layer0 = sum(b.total for n, b in per_module.items() if ".layers.0." in n)
    layer1 = plan["statistics_bytes"] - layer0
    assert plan["peak_bytes"] == max(layer0, layer1)
    assert plan["sequences"] == 40 and plan["probe_sequences"] == 8 and plan["seconds"] > 0
    # every pass is timed on its own targets; the set-up the init repeats is in the total
    assert len(plan["pass_seconds"]) == N_LAYERS and min(plan["pass_seconds"]) > 0
    assert plan["setup_seconds"] > 0 and plan["first_batch_seconds"] >= 0
    parts = ("one_time_seconds", "statistics_seconds", "solve_seconds")
    assert plan["seconds"] == pytest.approx(sum(plan[k] for k in parts))
    # The data's |S| is counted as the pass counts it: the probe's equals its diagnostics'.
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    batches = tokenize_batches(tok, list(TINY_TEXTS * 8), max_length=MAX_LENGTH)
    assert _units(batches[:8], LoraDAConfig())[2] == pytest.approx(plan["probe_sample_size"])
    assert _units(batches, LoraDAConfig())[2] == pytest.approx(plan["sample_size"])
    ratio = plan["sample_size"] / plan["probe_sample_size"]
    for m in plan["snr"]:  # the 1/|S| law where the probe saw a signal, else no SNR at all
        if m["probe_snr"] > 0:
            assert m["snr"] == pytest.approx(m["probe_snr"] * ratio), m
        else:
            assert math.isnan(m["snr"]), m
    assert {m["kind"] for m in plan["snr"]} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"}  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "probe SNR" in text and "at 40 sequences" in text


def test_plan_with_the_diagnostics_off_still_measures_the_snr(workspace, capsys):
    """The probe solves at the cheap tier whatever the init's tier (an init with the diagnostics
    off records no |S|; the plan needs it for its SNR)."""
    argv = ["plan", "--model", str(workspace / "model"), "--data", str(workspace / "calib.jsonl")]
    argv += ["--max-length", str(MAX_LENGTH), "--probe-sequences", "4", "--json"]
    assert main([*argv, "--diagnostics", "off"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["snr"] and plan["probe_sample_size"] > 0


def test_plan_probes_every_pass_and_solves_a_layer_of_each(tmp_path, monkeypatch):
    """Four layers, two per pass: each pass's statistics are probed on its own targets; the first
    pass's targets and the first layer of the second pass are solved. Breaks if only the first
    pass is probed (its time × passes) or solved."""
    from lora_da_ref.cli import plan as P

    assert main(["make-tiny-model", str(tmp_path / "model"), "--layers", "4"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    batches = tokenize_batches(tok, list(TINY_TEXTS * 2), max_length=MAX_LENGTH)
    config = LoraDAConfig(rank=RANK, layers_per_pass=2)
    targets = find_target_modules(model, list(config.target_modules))
    probed, solved = [], []
    time_statistics, solve = P._time_statistics, P._solve

    def spy_statistics(model, batches, chunk, config):
        probed.append(sorted(chunk))
        return time_statistics(model, batches, chunk, config)

    def spy_solve(stats, layers, config):
        solved.append(sorted(layers))
        return solve(stats, layers, config)

    monkeypatch.setattr(P, "_time_statistics", spy_statistics)
    monkeypatch.setattr(P, "_solve", spy_solve)
    plan = P.make_plan(model, batches, targets, config, probe=4, setup_seconds=1.5)
    layer = [sorted(n for n in targets if f".layers.{i}." in n) for i in range(4)]
    first, second = sorted(layer[0] + layer[1]), sorted(layer[2] + layer[3])
    assert probed == [first, first, second]  # the warm-up, then each pass
    assert solved == [first, layer[2]]
    assert plan.passes == [2, 2] and len(plan.pass_seconds) == 2
    assert plan.probe_targets == 21 and plan.setup_seconds == 1.5 and plan.seconds > 1.5


def test_calibration_summary_is_printed_without_progress(workspace, tmp_path, capsys):
    assert _init(workspace, tmp_path / "adapter") == 0  # _init passes --no-progress
    assert "LoRA-DA calibration:" in capsys.readouterr().err


def test_warnings_from_the_cli_name_its_flags(workspace, tmp_path, monkeypatch):
    """The pipeline's precision warning names Python arguments; the CLI's names --dtype and
    --damping (the warning is forced by a precision bound past the limit on one layer)."""
    import lora_da_ref.torch.peft_init as peft_init
    from lora_da_ref.torch.pipeline import warn_untrusted

    real = peft_init.get_lora_da_state_dict

    def imprecise(*args, **kwargs):
        state = real(*args, **kwargs)
        name = next(iter(state.factors))
        state.factors[name].diagnostics["precision_bound"] = 0.1
        warn_untrusted(state.factors)
        return state

    monkeypatch.setattr(peft_init, "get_lora_da_state_dict", imprecise)
    with pytest.warns(RuntimeWarning) as record:
        assert _init(workspace, tmp_path / "adapter") == 0
    texts = [str(w.message) for w in record if "A0" in str(w.message)]
    assert texts and all("--dtype float64" in t and "--damping" in t for t in texts), texts
    assert not any("LoraDAConfig(" in t or "diagnostics[" in t for t in texts), texts


def test_new_flags_reach_the_config(workspace, tmp_path):
    out = tmp_path / "adapter"
    flags = ["--preset", "official", "--damping", "0.05", "--damping-scale", "relative"]
    flags += ["--layers-per-pass", "1", "--max-statistics-bytes", "1G", "--n-train", "5000.5"]
    assert _init(workspace, out, *flags) == 0
    config = json.loads((out / "lora_da.json").read_text())["config"]
    assert (config["damping"], config["damping_scale"]) == (0.05, "relative")
    assert config["layers_per_pass"] == 1 and config["max_statistics_bytes"] == 2**30
    assert config["n_train"] == 5000.5 and config["solver"] == "lobpcg"


def test_report_ranks_flags_summarises_and_shows_one_snr(workspace, tmp_path, capsys):
    from lora_da_ref.cli.report import figure_panels, load_rows

    out = tmp_path / "adapter"
    assert _init(workspace, out) == 0
    meta = json.loads((out / "lora_da.json").read_text())
    layers = meta["layers"]
    for diag in layers.values():
        diag.pop("split_snr", None)  # the plug-in alone, as an init at diagnostics="off" +
        diag["calibration_snr"] = 3.0  # not flagged
        diag["residual"] = 1.2345678901234567e-9
        diag["damping"] = {"Z": 1e-6, "Y": 1e-6}  # absolute damping: the same in every layer
    layers["model.layers.0.mlp.up_proj"]["calibration_snr"] = 0.5  # 0.12 decades below 1
    layers["model.layers.1.mlp.down_proj"]["residual"] = 0.5  # 2.7 decades past 1e-3
    layers["model.layers.0.self_attn.q_proj"]["calibration_snr"] = -0.9  # 1.3 decades
    (out / "lora_da.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["report", str(out), "--no-figure", "--top", "2"]) == 1
    text = capsys.readouterr().out
    assert "1.23e-09" in text and "1.2345678901" not in text  # 3 significant digits
    assert "snr = (‖ΔŴ‖² − noise)/noise" in text and "below 1 the" in text
    flagged = [line.split(":")[0] for line in text.splitlines() if line.startswith("FLAGGED")]
    assert flagged == ["FLAGGED model.layers.1.mlp.down_proj",
                       "FLAGGED model.layers.0.self_attn.q_proj"]  # fmt: skip
    assert "... and 1 more" in text
    assert "medians over 14 layers:" in text and "snr 3" in text
    assert "flags by rule: snr 2, residual 1" in text
    _, rows = load_rows(out)
    panels = figure_panels(rows)
    assert "residual" in panels and "snr" in panels
    assert not any(p.startswith("damping") for p in panels)  # constant: the panel says nothing


def test_gsm8k_data_writes_the_prompt_completion_file_init_reads(tmp_path, capsys):
    """The recipe's data step: the first N problems of a fixed split, with the package's prompt
    template, as the pairs ``lora-da init --prompt-field prompt --completion-field completion``
    reads (catches a file init cannot read, or a split or limit not applied)."""
    from lora_da_ref.cli.jsonl import read_jsonl_pairs
    from lora_da_ref.real import GSM8K_TEMPLATE, gsm8k

    out = tmp_path / "calib.jsonl"
    assert main(["gsm8k-data", "--split", "validation", "--limit", "3", "--out", str(out)]) == 0
    pairs = read_jsonl_pairs(out, prompt_field="prompt", completion_field="completion")
    want = gsm8k("validation")[:3]
    assert [p for p, _ in pairs] == [GSM8K_TEMPLATE.format(question=r["question"]) for r in want]
    assert [c for _, c in pairs] == [r["answer"] for r in want]
    assert main(["gsm8k-data", "--limit", "0", "--out", str(out)]) == 2
