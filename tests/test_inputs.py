"""Inputs as Hugging Face users bring them (docs/numerics.md, "Inputs"): target modules written
as in PEFT, padding side, ``BatchEncoding`` / ``DataLoader`` batches, batch grouping, gradient
checkpointing."""

from __future__ import annotations

import re

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, collect_statistics, find_target_modules, init_lora_da
from tests.tiny_models import TINY_TEXTS, make_tiny_llama, make_tiny_tokenizer
from tests.torch_cases import LLAMA_TARGETS, single_thread, tiny_llama  # noqa: F401

# ----------------------------------------------------------------------------- target modules


def _peft_targets(model, target_modules) -> set[str]:
    """The module names PEFT itself wraps for ``LoraConfig(target_modules=...)`` (the oracle)."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=target_modules))
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n in wrapped.targeted_module_names}


@pytest.mark.parametrize(
    "spec",
    [
        "all-linear",
        "ALL-LINEAR",
        r".*\.(q_proj|v_proj)",
        r"model\.layers\.1\.mlp\..*_proj",
        ["q_proj", "down_proj"],
    ],
)
def test_target_modules_match_peft(spec):
    """The same names as PEFT's LoraConfig for the list, regex and 'all-linear' forms."""
    ours = set(find_target_modules(tiny_llama(), spec))
    assert ours == _peft_targets(tiny_llama(), spec)
    if spec in ("all-linear", "ALL-LINEAR"):
        assert len(ours) == 2 * len(LLAMA_TARGETS) and "lm_head" not in ours


def test_target_modules_order_and_config_roundtrip():
    model = tiny_llama()
    names = list(find_target_modules(model, "all-linear"))
    order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=order.index)
    assert LoraDAConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraDAConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)


def test_target_modules_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"full-matches no module.*pass a list"):
        find_target_modules(model, "q_proj")  # a str is a regex on the full name (PEFT)
    with pytest.raises(ValueError, match=r"only nn\.Linear"):
        find_target_modules(model, r".*\.mlp")  # LlamaMLP, a container
    with pytest.raises(ValueError, match="does not compile"):
        find_target_modules(model, "(q_proj")
    with pytest.raises(ValueError, match="does not compile"):
        LoraDAConfig(target_modules="(q_proj")
    with pytest.raises(ValueError, match="'nope' matches no module"):
        find_target_modules(model, ["q_proj", "nope"])
    with pytest.raises(TypeError, match="target_modules must be"):
        find_target_modules(model, 3)


def test_all_linear_excludes_classifier_head():
    """A sequence-classification model has no output embeddings: its 'score' head is excluded."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, num_labels=3,
    )  # fmt: skip
    names = set(find_target_modules(LlamaForSequenceClassification(cfg), "all-linear"))
    assert "score" not in names and len(names) == len(LLAMA_TARGETS)


# ----------------------------------------------------------------------------- batches


def _collated(side: str, texts, batch_size: int, max_length: int = 40):
    """HF's standard causal-LM pipeline: tokenizer padding on ``side`` + DataCollatorForLanguageModeling
    (labels = input_ids with the pad positions at -100)."""
    from transformers import DataCollatorForLanguageModeling

    tok = make_tiny_tokenizer()
    tok.padding_side = side
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    rows = [tok(t, truncation=True, max_length=max_length) for t in texts]
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def test_right_pad_builds_the_batches_of_hf_right_padding():
    """``tokenize_batches`` (through ``lora_da_ref.data.right_pad``) gives, tensor for tensor,
    the batches of HF's right padding + DataCollatorForLanguageModeling: the same ids, mask and
    labels (-100 on padding), so the package's own batches are what a HF user brings."""
    from lora_da_ref.data import tokenize_batches

    ours = tokenize_batches(make_tiny_tokenizer(), TINY_TEXTS, max_length=40, batch_size=3)
    theirs = _collated("right", TINY_TEXTS, batch_size=3, max_length=40)
    assert len(ours) == len(theirs) > 1
    assert any((b["attention_mask"] == 0).any() for b in ours)  # some rows are padded
    for a, b in zip(ours, theirs):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[key], b[key]), key


def _stats(model, batches, config, targets=None, **kw):
    targets = find_target_modules(model, LLAMA_TARGETS) if targets is None else targets
    return collect_statistics(model, batches, targets, config, progress=False, **kw)


def _max_rel_diff(a, b) -> float:
    """max over Z, Y, G of every layer of ‖a − b‖_F / ‖b‖_F."""
    out = 0.0
    for kind in ("Z", "Y", "G"):
        da, db = getattr(a, kind), getattr(b, kind)
        assert da.keys() == db.keys()
        for k in db:
            out = max(out, float((da[k] - db[k]).norm() / db[k].norm()))
    return out


# Left and right padding feed a causal LM the same tokens at the same relative positions. With
# ``position_ids`` from the attention mask (prepare_batch, left-padded batches) every token also
# keeps its absolute position, so a float64 model gives the same statistics up to the order of
# float64 sums: measured 1.4e-16 (default) / 1.5e-16 (official) here; 1e-13 leaves room for other
# BLAS kernels. Without them (the model numbers the pads; HF computes RoPE's cos/sin in float32)
# the difference was 2.2e-8 / 2.6e-8, and before the label-mask fix O(1) (pad → BOS counted as a
# loss token). A float32 model: 6.8e-8 / 8.0e-8 measured, against the float32 bound 1e-6.
PADDING_RTOL = {torch.float64: 1e-13, torch.float32: 1e-6}

_PRESETS = {
    "default": lambda **kw: LoraDAConfig(**kw),
    "official": lambda **kw: LoraDAConfig.official(**kw),
    "attention-mask": lambda **kw: LoraDAConfig(token_mask="attention", **kw),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preset", list(_PRESETS))
def test_left_padding_gives_the_statistics_of_right_padding(preset, dtype):
    """The pad position before BOS (left padding) must not count as a loss token, nor in the
    loss, and the tokens keep their positions (position_ids from the attention mask)."""
    model = make_tiny_llama(dtype=dtype)
    config = _PRESETS[preset](rank=2, dtype=dtype)
    left = _collated("left", TINY_TEXTS, batch_size=3)
    right = _collated("right", TINY_TEXTS, batch_size=3)
    assert (left[0]["attention_mask"][:, 0] == 0).any()  # some sequences really are left-padded
    a, b = _stats(model, left, config), _stats(model, right, config)
    assert (a.tokens, a.loss_tokens, a.sequences) == (b.tokens, b.loss_tokens, b.sequences)
    assert _max_rel_diff(a, b) <= PADDING_RTOL[dtype]


def test_position_ids_are_added_only_to_left_padded_batches_of_models_that_take_them():
    from lora_da_ref.torch.statistics import prepare_batch

    cfg, cpu = LoraDAConfig(), torch.device("cpu")
    left, right = _collated("left", TINY_TEXTS, 3)[0], _collated("right", TINY_TEXTS, 3)[0]
    model = make_tiny_llama()
    got = prepare_batch(left, cpu, cfg, model)["position_ids"]
    mask = left["attention_mask"]
    for row, m in zip(got, mask, strict=True):
        n_pad = int((m == 0).sum())
        assert row[n_pad:].tolist() == list(range(int(m.sum())))  # 0, 1, … from the first token
    assert "position_ids" not in prepare_batch(right, cpu, cfg, model)
    assert "position_ids" not in prepare_batch(left, cpu, cfg, None)
    given = {**left, "position_ids": torch.zeros_like(mask)}
    assert prepare_batch(given, cpu, cfg, model)["position_ids"].eq(0).all()  # the user's wins
    no_positions = torch.nn.Linear(3, 3)  # forward(input) takes no position_ids
    assert "position_ids" not in prepare_batch(left, cpu, cfg, no_positions)


def test_loss_given_to_loss_fn_skips_the_pad_position_before_bos():
    """The batch the loss sees has the pad → BOS label masked: its loss equals right padding's."""
    from lora_da_ref.torch.statistics import prepare_batch

    model = make_tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig()
    losses = {}
    for side in ("left", "right"):
        raw = _collated(side, TINY_TEXTS[:2], 2)[0]
        batch = prepare_batch(raw, torch.device("cpu"), cfg, model)
        losses[side] = float(model(**batch).loss)
    # HF's loss casts the logits to float32 (even in a float64 model): float32's bound
    assert losses["left"] == pytest.approx(losses["right"], rel=PADDING_RTOL[torch.float32])


def test_batch_encoding_and_dataloader_batches():
    """A BatchEncoding list and a DataLoader with a DataCollator give the dict batches' statistics."""
    from transformers import BatchEncoding, DataCollatorForLanguageModeling

    model = make_tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig(rank=2, dtype=torch.float64)
    encodings = _collated("right", TINY_TEXTS, batch_size=2)
    assert all(isinstance(e, BatchEncoding) and not isinstance(e, dict) for e in encodings)
    plain = _stats(model, [dict(e) for e in encodings], cfg)
    as_encodings = _stats(model, encodings, cfg)
    tok = make_tiny_tokenizer()
    rows = [tok(t, truncation=True, max_length=40) for t in TINY_TEXTS]
    loader = torch.utils.data.DataLoader(
        rows, batch_size=2, collate_fn=DataCollatorForLanguageModeling(tok, mlm=False)
    )
    from_loader = _stats(model, loader, cfg)
    assert _max_rel_diff(as_encodings, plain) == 0.0
    assert _max_rel_diff(from_loader, plain) == 0.0
    factors = init_lora_da(model, loader, cfg.replace(n_train=100), progress=False)
    assert len(factors) == 2 * len(LLAMA_TARGETS)


def test_bad_batch_types_raise_type_error():
    model = make_tiny_llama()
    cfg = LoraDAConfig(rank=2)
    batch = dict(_collated("right", TINY_TEXTS[:2], 2)[0])
    cases = {
        "Mapping of tensors": [[batch["input_ids"], batch["labels"]]],  # a TensorDataset-like list
        "not a tensor": [{**batch, "input_ids": batch["input_ids"].tolist()}],
        "not a single": batch,  # one batch instead of an iterable of batches
    }
    for message, batches in cases.items():
        with pytest.raises(TypeError, match=message):
            _stats(model, batches, cfg)


def _bad_batches(batch: dict) -> dict[str, tuple[object, type, str]]:
    """Each kind of bad calibration data: (batches, the error, a fragment of its one message)."""
    no_selector = {"input_ids": batch["input_ids"]}
    return {
        "single dict": (batch, TypeError, "not a single dict: wrap one batch in a list"),
        "not iterable": (3, TypeError, "must be an iterable of batches"),
        "empty": ([], ValueError, "batches is empty"),
        "str batch": (["text"], TypeError, r"batch 0 is a str: .*Mapping.*wrap it in a list"),
        "tensor list": ([[batch["input_ids"]]], TypeError, "batch 0 is a list: each batch must"),
        "list ids": ([{**batch, "input_ids": [1, 2]}], TypeError, "'input_ids' is a list, not"),
        "no selector": ([batch, no_selector], ValueError, "batch 1 has neither 'labels' nor"),
    }


def _entry_points(model, cfg, targets):
    """Every public entry that takes calibration batches, as ``call(batches)``."""
    from peft import LoraConfig, get_peft_model

    from lora_da_ref.torch import get_lora_da_state_dict, initialize_lora_da_weights
    from lora_da_ref.torch.baselines import lora_one
    from lora_da_ref.torch.statistics import accumulate_statistics

    lora = LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=list(LLAMA_TARGETS))
    peft_model = get_peft_model(make_tiny_llama(), lora)
    quiet = {"progress": False}
    return {
        "init_lora_da": lambda b: init_lora_da(model, b, cfg, **quiet),
        "collect_statistics": lambda b: collect_statistics(model, b, targets, cfg, **quiet),
        "accumulate_statistics": lambda b: accumulate_statistics(model, b, targets, cfg, **quiet),
        "get_lora_da_state_dict": lambda b: get_lora_da_state_dict(model, b, lora, **quiet),
        "initialize_lora_da_weights": lambda b: initialize_lora_da_weights(peft_model, b, **quiet),
        "lora_one": lambda b: lora_one(model, b, rank=2, target_modules=LLAMA_TARGETS),
    }


def _distributed_entry_points(model, cfg, targets, group):
    from lora_da_ref.torch import init_lora_da_distributed
    from lora_da_ref.torch.distributed import collect_statistics_distributed

    return {
        "init_lora_da_distributed": lambda b: init_lora_da_distributed(
            model, b, targets, cfg, group, progress=False
        ),
        "collect_statistics_distributed": lambda b: collect_statistics_distributed(
            model, b, targets, cfg, group, progress=False
        ),
    }


def _raised(call, batches) -> tuple[type, str]:
    try:
        call(batches)
    except (TypeError, ValueError) as err:
        return type(err), str(err)
    return type(None), "no error"


def test_every_entry_point_gives_one_message_per_kind_of_bad_batches():
    """The batches are checked in one place (``materialise_batches``), once per entry point:
    the same bad input gets the same error, word for word, from every public entry."""
    import torch.distributed as dist

    pytest.importorskip("peft")
    model, cfg = make_tiny_llama(), LoraDAConfig(rank=2)
    targets = find_target_modules(model, LLAMA_TARGETS)
    batch = dict(_collated("right", TINY_TEXTS[:2], 2)[0])
    cases = _bad_batches(batch)
    got = {kind: {} for kind in cases}
    entries = _entry_points(model, cfg, targets)
    for kind, (batches, _, _) in cases.items():
        for entry, call in entries.items():
            if not (kind == "empty" and entry == "accumulate_statistics"):  # a shard may be empty
                got[kind][entry] = _raised(call, batches)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        entries = _distributed_entry_points(model, cfg, targets, dist.group.WORLD)
        for kind, (batches, _, _) in cases.items():
            for entry, call in entries.items():
                got[kind][entry] = _raised(call, batches)
    finally:
        dist.destroy_process_group()
    for kind, (_, error, fragment) in cases.items():
        distinct = set(got[kind].values())
        assert len(distinct) == 1, f"{kind}: {len(distinct)} messages: {got[kind]}"
        ((raised, message),) = distinct
        assert raised is error and re.search(fragment, message), (kind, message)


def test_batches_move_to_the_model_device():
    """A meta-device model cannot run; instead check the moved batch lands on the given device."""
    from lora_da_ref.torch.statistics import prepare_batch

    batch = _collated("right", TINY_TEXTS[:2], 2)[0]
    moved = prepare_batch(batch, torch.device("meta"), LoraDAConfig())
    assert type(moved) is dict and all(v.device.type == "meta" for v in moved.values())


# ----------------------------------------------------------------------------- batch grouping


def _per_sequence_reference(model, batches, targets, cfg):
    """The official statistics by definition, one sequence at a time (no batching at all):
    s_t = ∂L_i/∂o_t with L_i sequence i's mean loss, Y = Σ_t s_t s_tᵀ / |P| (diagonal kept),
    G = mean over sequences of ∇_W L_i."""
    from lora_da_ref.torch.statistics import prepare_batch, token_masks

    names = list(targets)
    Y = dict.fromkeys(names, 0)
    G = dict.fromkeys(names, 0)
    count = sequences = 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = prepare_batch({k: v[i : i + 1] for k, v in batch.items()}, "cpu", cfg)
            keep = one["attention_mask"][0].bool()  # drop the padding: the sequence alone
            one = {k: v[:, keep] for k, v in one.items()}
            outs = {}
            hooks = [
                m.register_forward_hook(lambda mod, a, o, n=n, outs=outs: outs.__setitem__(n, o))
                for n, m in targets.items()
            ]
            loss = model(**one).loss
            for h in hooks:
                h.remove()
            positions, _ = token_masks(one, cfg)
            scores = torch.autograd.grad(loss, [outs[n] for n in names], retain_graph=True)
            grads = torch.autograd.grad(loss, [targets[n].weight for n in names])
            for n, s, gw in zip(names, scores, grads):
                Y[n] = Y[n] + (s[positions] ** 2).sum(0)
                G[n] = G[n] + gw.T
            count += int(positions.sum())
            sequences += 1
    return {n: Y[n] / count for n in names}, {n: G[n] / sequences for n in names}


# 1e-6, not float64 round-off: the loss's softmax runs in float32 (HF casts the logits) even here.
GROUPING_RTOL = 1e-6


def test_official_statistics_do_not_depend_on_batch_grouping():
    """Official preset (score_scale="batch", gradient_weight="sequence"): batch size 1, 2 and 5
    give the per-sequence definition (= the official code at batch size 1)."""
    model = make_tiny_llama(dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = LoraDAConfig.official(rank=2, dtype=torch.float64)
    targets = find_target_modules(model, LLAMA_TARGETS)
    Y_ref, G_ref = _per_sequence_reference(model, _collated("right", TINY_TEXTS, 5), targets, cfg)
    for batch_size in (1, 2, 5):
        stats = _stats(model, _collated("right", TINY_TEXTS, batch_size), cfg)
        for n in targets:
            for got, ref in ((stats.Y[n], Y_ref[n]), (stats.G[n], G_ref[n])):
                err = float((got - ref).norm() / ref.norm())
                assert err <= GROUPING_RTOL, f"batch size {batch_size}, {n}: {err:.2e}"


def test_official_factors_do_not_depend_on_batch_grouping():
    """End to end: A0 of batch size 1 and 3 span the same subspace (largest principal angle)."""
    model = make_tiny_llama(dtype=torch.float64)
    cfg = LoraDAConfig.official(rank=2, dtype=torch.float64, solver="eigh", solver_options={})
    one = init_lora_da(model, _collated("right", TINY_TEXTS, 1), cfg, progress=False)
    three = init_lora_da(model, _collated("left", TINY_TEXTS, 3), cfg, progress=False)
    for n in one:
        angle = _largest_angle(one[n].A, three[n].A)
        assert angle < 1e-4, f"{n}: largest principal angle {angle:.2e} rad"


def _largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, qb = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    cos = torch.linalg.svdvals(qa.mT @ qb).clamp(max=1.0)
    return float(torch.arccos(cos.min()))


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_is_honoured(reentrant):
    """With checkpointing on, the layers really recompute during the pass (the target's forward
    runs twice per batch; torch's non-reentrant checkpoint stops its recompute early, so the
    probe is the MLP activation, which must be recomputed), the statistics are those without it, and the model is restored."""
    from tests.torch_cases import assert_state_equal, model_state

    plain = make_tiny_llama(dtype=torch.float64)
    model = make_tiny_llama(dtype=torch.float64)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    before = model_state(model)
    calls = []
    probe = model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    cfg = LoraDAConfig(rank=2, dtype=torch.float64)
    batches = _collated("right", TINY_TEXTS, 2)
    got = _stats(model, batches, cfg)
    probe.remove()
    assert len(calls) == 2 * len(batches), "the layer was not recomputed: checkpointing is off"
    assert _max_rel_diff(got, _stats(plain, batches, cfg)) <= 1e-10
    assert_state_equal(before, model_state(model))
