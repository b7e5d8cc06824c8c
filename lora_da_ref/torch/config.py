"""Configuration and result types of the torch production path (Algorithm 1).

Conventions: the math uses the paper's orientation, ``W`` of shape ``(d_in, d_out)``;
``torch.nn.Linear.weight`` is ``Wᵀ``. The LoRA update is ``W0 + A B`` with ``A`` (d_in, r) and
``B`` (r, d_out); PEFT stores ``lora_A.weight = Aᵀ`` and ``lora_B.weight = Bᵀ``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lora_da_ref.presets import PRESETS, get_preset
from lora_da_ref.torch.solvers import DEFAULT_SOLVER, SOLVERS

__all__ = [
    "LoraDAConfig",
    "LoraFactors",
    "SolveConfig",
    "StatisticsConfig",
    "preset_of",
    "rank_of",
    "solve_config_of",
    "statistics_config_of",
]

# δ of the relative damping λ = δ·tr(M)/d (docs/numerics.md, "Precision and damping").
DEFAULT_RELATIVE_DAMPING = 1e-2  # GPTQ's percdamp; measured: docs/numerics.md

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraDAConfig:
    """Settings of LoRA-DA's Algorithm 1.

    The defaults are the ``default`` preset (:mod:`lora_da_ref.presets`): the official code's
    objective and scaling (β = 0.03, diagonal Y, ΔW normalised by σ, γ = 1024, the official
    per-sequence weighting) with robust numerics (relative damping, float64 solves, eigh). The
    other presets: :meth:`official` (the official numerics, for fidelity) and
    :meth:`paper_literal` (Algorithm 1 as printed: not for training).

    Attributes:
        rank: LoRA rank ``r``.
        target_modules: as PEFT's ``LoraConfig``: a list of module-name suffixes (``"q_proj"``
            matches ``...self_attn.q_proj``), a regex string (full match) or ``"all-linear"``
            (:func:`lora_da_ref.torch.targets.find_target_modules`).
        n_train: ``N``, the fine-tuning set size in the units of the Fisher the statistics
            estimate (Eq. 19, ``Ω = β tr(Y⁻¹)/N · Z⁻¹ − αΔWΔWᵀ``), the units of the
            calibration size |S| (:func:`lora_da_ref.torch.diagnostics.plug_in_sample_size`):
            ``W²/|P|`` of the fine-tuning set (:func:`lora_da_ref.torch.diagnostics.fisher_units`):
            its loss tokens for the per-token settings of ``paper_literal``, its sequences over
            their mean length for the official per-sequence settings. The official code passes
            the number of training samples (100 000), which this default keeps.
        variance_weight: ``β``, weight of the variance term (official code: 0.03; paper: 1).
        bias_weight: ``α``, weight of the bias term ``ΔWΔWᵀ`` (1 in both).
        output_factor: ``"diagonal"`` keeps only diag(Y) (official code); ``"full"`` is the
            paper's K-FAC ``J ≈ Y ⊗ Z``.
        damping: added to the diagonals of ``Z`` and ``Y`` before inverting: with
            ``damping_scale="relative"`` (default) ``λ_Z = δ·tr(Z)/d_in`` and
            ``λ_Y = δ·tr(Y)/d_out`` with ``δ = damping``, so the result does not depend on the
            scale of the inputs or the loss; with ``"absolute"`` (official preset, 1e-6)
            ``λ_Z = λ_Y = damping``. A damped factor that is not positive definite raises.
        damping_scale: ``"relative"`` or ``"absolute"`` (see ``damping``).
        normalize_delta: divide ΔW by its top singular value σ (and the variance term by σ²),
            as the official code does; A0 is unchanged, B0 = A0ᵀ ΔW / σ.
        scale_gamma: ``γ``; both factors are divided by ``√γ`` (official: 1024). ``None`` = off.
        solver: ``"auto"`` (default: ``"eigh"`` below ``solvers.AUTO_CERTIFIED_MIN_DIM``,
            ``"certified"`` from there),
            ``"eigh"`` (dense, exact), ``"lobpcg"`` or ``"certified"`` (block LOBPCG run until
            a Davis–Kahan bound certifies the subspace to ``tol_angle``, else eigh).
        solver_options: options of the solver, e.g. ``{"niter": 10, "tol": 1e-6}``.
        seed: seed of the solver's random start.
        dtype: dtype of the statistics (float32 default; float64 allowed).
        layers_per_pass: ``None`` (default) = as many transformer layers per pass as the memory
            budget allows (one pass when the statistics fit); ``k`` = re-run the model once per
            group of ``k`` layers' targets (the official code: 8), whatever the budget.
        max_statistics_bytes: the memory budget of one pass's statistics: ``"auto"`` (default)
            = :data:`lora_da_ref.torch.memory.AUTO_BUDGET_FRACTION` of the memory available on
            the device the model is on when the init starts; an integer = that many bytes;
            ``None`` = no budget. The plan is made before any pass, from the layer shapes
            (:mod:`lora_da_ref.torch.memory`).
        token_mask: which positions the K-FAC factors Z and Y average over: ``"labels"`` = the
            loss tokens (``labels != -100``, shifted by ``label_shift``) when the batch has labels,
            else ``attention_mask``; ``"attention"`` = every ``attention_mask`` position (official).
        label_shift: position ``t`` is a loss token iff ``labels[t + label_shift] != -100``
            (HF causal LMs predict token t+1 from position t: 1; per-position labels: 0).
        score_scale: the output gradient used in Y. ``"token"``: the per-token score
            ``s_t = T_b · ∂L_b/∂o_t`` (``L_b`` the batch's mean loss over its ``T_b`` loss
            tokens) — the paper's per-token Fisher. ``"batch"``: ``∂L_i/∂o_t``, the gradient of
            the mean loss of the position's own sequence ``i`` (official code, which runs at batch
            size 1; Y is then ``~1/T_i²`` smaller, which changes the effective β). Computed per
            sequence, so the result does not depend on how sequences are grouped into batches.
        gradient_weight: G is the gradient of the token-mean loss over all sequences
            (``"token"``) or the mean over sequences of each sequence's mean-loss gradient
            (``"sequence"``: the official ``estimate_gradient`` at batch size 1, for any batch size).
        diagnostics: what each layer's solve measures besides A0 and B0
            (:mod:`lora_da_ref.torch.diagnostics`, docs/numerics.md "Diagnostics tiers").
            ``"cheap"`` (default; nearly free): the damping applied, κ of the damped factors,
            the eigengap at r, the solver residual, the plug-in and split-half calibration SNR
            (the pass keeps the even/odd gradient sums: one extra (d_in, d_out) matrix per layer)
            and a first-order precision bound; a layer the bound cannot clear (above 1e-3 rad)
            is re-solved once from perturbed statistics, read with a margin for its one draw
            (:func:`lora_da_ref.precision.layer_precision` decides the precision warning).
            ``"full"``: also the split-half solves (A0 of each half: principal angles, regret)
            and the perturbation probe (one more solve per layer). ``"off"``: none of the
            calibration measurements and no precision warning (the damping, κ and the solver's
            own diagnostics stay).
        estimator: how Ω is estimated from the calibration statistics (docs/regime.md; every
            preset: ``"plugin"``). ``"plugin"``: Eq. (19) with ``ΔŴ`` and ``Ĵ`` in place of ΔW
            and J. ``"debiased"``: variance weight ``β(1 + N/|S|)``, which removes the
            calibration noise ``Σ_i Ĵ⁻¹_[i]/|S|`` that ``ΔŴΔŴᵀ`` carries (claim 14);
            ``"damped"``: bias weight ``α·max(0, 1 − noise/‖ΔŴ‖²)``, the bias term scaled by its
            estimated signal fraction (0, i.e. "w/o bias", when the calibration SNR < 0).
            ``|S| = W²/|P|`` and ``noise = tr(Σ_i Ĵ⁻¹_[i])/|S|`` are those of the calibration
            diagnostics (:mod:`lora_da_ref.torch.diagnostics`), in the units of ``n_train``.
            The twins of ``lora_da_debiased`` / ``lora_da_damped`` in
            :data:`lora_da_ref.reference.initializers.INITIALIZERS`.
        solve_workers: how many layer groups (the layers reading one input share Z's factor)
            are solved side by side, in threads, each on one BLAS thread
            (:mod:`lora_da_ref.torch.threads`). ``None``: torch's thread count
            (``torch.get_num_threads()``), at most 8, for statistics on the CPU with no input
            wider than 4096 (each worker holds its group's d × d float64 temporaries); else 1.
            With 1 the solves run one after another on torch's threads. Every value ≥ 2 gives
            bit-identical factors; they differ from 1's by round-off only.
        See :mod:`lora_da_ref.torch.statistics` for the exact normalisation.
    """

    rank: int = 8
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    n_train: float = 100_000
    variance_weight: float = 0.03
    bias_weight: float = 1.0
    output_factor: Literal["diagonal", "full"] = "diagonal"
    damping: float = DEFAULT_RELATIVE_DAMPING
    damping_scale: Literal["relative", "absolute"] = "relative"
    normalize_delta: bool = True
    scale_gamma: float | None = 1024.0
    solver: Literal["auto", "eigh", "lobpcg", "certified"] = DEFAULT_SOLVER
    solver_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    layers_per_pass: int | None = None
    max_statistics_bytes: int | Literal["auto"] | None = "auto"
    token_mask: Literal["labels", "attention"] = "attention"
    label_shift: int = 1
    score_scale: Literal["token", "batch"] = "batch"
    gradient_weight: Literal["token", "sequence"] = "sequence"
    diagnostics: Literal["off", "cheap", "full"] = "cheap"
    estimator: Literal["plugin", "debiased", "damped"] = "plugin"
    solve_workers: int | None = None

    def __post_init__(self) -> None:
        # A str is PEFT's regex (or "all-linear") and stays a str; a list is stored as a tuple.
        targets = self.target_modules
        targets = targets if isinstance(targets, str) else tuple(targets)
        object.__setattr__(self, "target_modules", targets)
        _validate(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LoraDAConfig:
        """The preset ``name`` of :data:`lora_da_ref.presets.PRESETS` (its settings, every other
        field at its default), with ``overrides`` on top."""
        return cls(**{**get_preset(name).settings, **overrides})

    @classmethod
    def official(cls, **overrides: Any) -> LoraDAConfig:
        """``conf/lora_da.yaml`` of the official code (docs/equations.md, "Official code"; the ``official``
        preset). Its 8 layers per pass is ``layers_per_pass=8``."""
        return cls.preset("official", **overrides)

    @classmethod
    def paper_literal(cls, **overrides: Any) -> LoraDAConfig:
        """Algorithm 1 as printed: β = α = 1, full Y, no normalisation or γ, eigh (the
        ``paper_literal`` preset). Not for training with ``offset="none"``: B0 is unscaled."""
        return cls.preset("paper_literal", **overrides)

    @property
    def scales_b0(self) -> bool:
        """:attr:`SolveConfig.scales_b0` of this config's solves."""
        return self.solve_config().scales_b0

    def statistics_config(self) -> StatisticsConfig:
        """The first stage's part: what the statistics pass depends on. The diagnostics tier
        decides its optional accumulators: the even/odd gradient sums (any tier but ``"off"``)
        and the rounding measurement (``"full"``: about 0.2× a plain training pass, not nearly
        free)."""
        return StatisticsConfig(
            **{f: getattr(self, f) for f in _STATISTICS_FIELDS},
            split_halves=self.diagnostics != "off",
            measure_rounding=self.diagnostics == "full",
        )

    def solve_config(self) -> SolveConfig:
        """The second stage's part: the objective, the numerics and the diagnostics tier of the
        per-layer solves (no forward pass)."""
        return SolveConfig(**{f: getattr(self, f) for f in _SOLVE_FIELDS})

    def replace(self, **changes: Any) -> LoraDAConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StatisticsConfig:
    """Settings of the statistics pass (Algorithm 1, step 1: ``Z``, ``Y``, ``G`` by hooks).

    The fields are :class:`LoraDAConfig`'s of the same names (see there): ``token_mask``,
    ``label_shift``, ``score_scale``, ``gradient_weight``, ``output_factor``, ``dtype`` (of the
    per-batch products; the running sums are float64), ``layers_per_pass`` and
    ``max_statistics_bytes``. Two optional accumulators, absent and free when off:

    Attributes:
        split_halves: keep the gradient sums of the even- and of the odd-numbered sequences
            apart (one more (d_in, d_out) matrix per layer, no extra flops): the split-half
            calibration diagnostics need them.
        measure_rounding: sum each float32 product once more in float64, sketched by
            :data:`~lora_da_ref.torch.statistics.ROUNDING_PROBES` sign columns, to measure the
            rounding the statistics carry (nothing to measure for float64 products).
    """

    token_mask: Literal["labels", "attention"] = "attention"
    label_shift: int = 1
    score_scale: Literal["token", "batch"] = "batch"
    gradient_weight: Literal["token", "sequence"] = "sequence"
    output_factor: Literal["diagonal", "full"] = "diagonal"
    dtype: torch.dtype = torch.float32
    layers_per_pass: int | None = None
    max_statistics_bytes: int | Literal["auto"] | None = "auto"
    split_halves: bool = True
    measure_rounding: bool = False

    def __post_init__(self) -> None:
        _validate_statistics(self)

    @property
    def records_rounding(self) -> bool:
        """Whether the pass measures its rounding: asked for, and products below float64."""
        return self.measure_rounding and self.dtype != torch.float64

    def replace(self, **changes: Any) -> StatisticsConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SolveConfig:
    """Settings of the per-layer solves (Algorithm 1, steps 2–5), read from the statistics with
    no forward pass. The fields are :class:`LoraDAConfig`'s of the same names (see there):
    ``n_train``, ``variance_weight``, ``bias_weight``, ``damping``, ``damping_scale``,
    ``normalize_delta``, ``scale_gamma``, ``solver``, ``solver_options``, ``seed``,
    ``estimator``, ``diagnostics`` (the tier the entry points diagnose at) and
    ``solve_workers``. The LoRA rank is the solve's argument (a rank per layer allowed), not a
    setting."""

    n_train: float = 100_000
    variance_weight: float = 0.03
    bias_weight: float = 1.0
    damping: float = DEFAULT_RELATIVE_DAMPING
    damping_scale: Literal["relative", "absolute"] = "relative"
    normalize_delta: bool = True
    scale_gamma: float | None = 1024.0
    solver: Literal["auto", "eigh", "lobpcg", "certified"] = DEFAULT_SOLVER
    solver_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    estimator: Literal["plugin", "debiased", "damped"] = "plugin"
    diagnostics: Literal["off", "cheap", "full"] = "cheap"
    solve_workers: int | None = None

    def __post_init__(self) -> None:
        _validate_solve(self)

    def __hash__(self) -> int:  # solver_options is a dict
        return hash(tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(self).items())))

    @property
    def scales_b0(self) -> bool:
        """Whether B0 = A0ᵀΔŴ is scaled for training (σ-normalised or divided by √γ); the
        literal reading of Algorithm 1 is not (``paper_literal``: not for training)."""
        return self.normalize_delta or self.scale_gamma is not None

    def replace(self, **changes: Any) -> SolveConfig:
        return dataclasses.replace(self, **changes)


_STATISTICS_FIELDS = (
    "token_mask", "label_shift", "score_scale", "gradient_weight", "output_factor", "dtype",
    "layers_per_pass", "max_statistics_bytes",
)  # fmt: skip
_SOLVE_FIELDS = tuple(
    f.name for f in dataclasses.fields(SolveConfig)
)  # every SolveConfig field is a LoraDAConfig field of the same name


def rank_of(config: LoraDAConfig | SolveConfig, rank: int | None) -> int:
    """``rank``, else the bundle's ``config.rank`` (a :class:`SolveConfig` holds no rank)."""
    if rank is not None:
        return rank
    if isinstance(config, LoraDAConfig):
        return config.rank
    raise TypeError("rank is required with a SolveConfig (the LoRA rank is not a solve setting)")


def statistics_config_of(config: LoraDAConfig | StatisticsConfig | None) -> StatisticsConfig:
    """The statistics settings of ``config`` (a :class:`LoraDAConfig` is split; ``None``: the
    default preset's)."""
    return _stage_config(config, StatisticsConfig, LoraDAConfig.statistics_config)


def solve_config_of(config: LoraDAConfig | SolveConfig | None) -> SolveConfig:
    """The solve settings of ``config`` (a :class:`LoraDAConfig` is split; ``None``: the
    default preset's)."""
    return _stage_config(config, SolveConfig, LoraDAConfig.solve_config)


def _stage_config(config: Any, kind: type, split: Any) -> Any:
    """``config`` if it is already a ``kind``, else ``split`` of the bundle (the default's)."""
    if isinstance(config, kind):
        return config
    if config is None or isinstance(config, LoraDAConfig):
        return split(LoraDAConfig() if config is None else config)
    raise TypeError(
        f"config must be a {kind.__name__} or LoraDAConfig, got {type(config).__name__}"
    )


# Fields a user sets freely on top of a preset: they change neither the objective nor the numerics
# of the solve, so they do not change which preset a config is.
_FREE_FIELDS = (
    "rank", "target_modules", "n_train", "seed", "dtype", "layers_per_pass",
    "max_statistics_bytes", "diagnostics", "solve_workers",
)  # fmt: skip


def preset_of(config: LoraDAConfig) -> str | None:
    """The preset (:data:`lora_da_ref.presets.PRESETS`) ``config`` is, up to the free fields."""
    for name in PRESETS:
        ref = LoraDAConfig.preset(name)
        if config.replace(**{k: getattr(ref, k) for k in _FREE_FIELDS}) == ref:
            return name
    return None


_CHOICES = {
    "output_factor": ("diagonal", "full"),
    "solver": tuple(SOLVERS),
    "damping_scale": ("relative", "absolute"),
    "token_mask": ("labels", "attention"),
    "score_scale": ("token", "batch"),
    "gradient_weight": ("token", "sequence"),
    "estimator": ("plugin", "debiased", "damped"),
    "diagnostics": ("off", "cheap", "full"),
}


def _validate(c: LoraDAConfig) -> None:
    """Reject bad settings early, naming the field: the bundle's own (rank, targets), then each
    stage's by building it (its checks live with it)."""
    _positive_int("rank", c.rank)
    if isinstance(c.target_modules, str):
        _regex_or_all_linear(c.target_modules)
    elif not c.target_modules or not all(isinstance(t, str) and t for t in c.target_modules):
        raise ValueError(
            f"target_modules must be non-empty module-name suffixes, got {c.target_modules!r}"
        )
    _check_choices(c, ("diagnostics",))
    c.statistics_config()
    c.solve_config()


def _check_choices(c: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(c, name) not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {getattr(c, name)!r}")


def _validate_statistics(c: StatisticsConfig) -> None:
    if c.layers_per_pass is not None:
        _positive_int("layers_per_pass", c.layers_per_pass)
    if c.max_statistics_bytes not in (None, "auto"):
        _positive_int("max_statistics_bytes", c.max_statistics_bytes)
    if isinstance(c.label_shift, bool) or not isinstance(c.label_shift, int) or c.label_shift < 0:
        raise ValueError(f"label_shift must be a non-negative integer, got {c.label_shift!r}")
    _check_choices(c, ("output_factor", "token_mask", "score_scale", "gradient_weight"))
    if c.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {c.dtype}")
    for name in ("split_halves", "measure_rounding"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(c, name)!r}")


def _validate_solve(c: SolveConfig) -> None:
    if not _finite("n_train", c.n_train) > 0:
        raise ValueError(f"n_train must be positive, got {c.n_train}")
    if c.solve_workers is not None:
        _positive_int("solve_workers", c.solve_workers)
    if not isinstance(c.normalize_delta, bool):
        raise TypeError(f"normalize_delta must be True or False, got {c.normalize_delta!r}")
    _check_choices(c, ("solver", "damping_scale", "estimator", "diagnostics"))
    _finite("variance_weight", c.variance_weight)
    _finite("bias_weight", c.bias_weight)
    if _finite("damping", c.damping) < 0:
        raise ValueError(f"damping must be >= 0, got {c.damping}")
    if c.scale_gamma is not None and not _finite("scale_gamma", c.scale_gamma) > 0:
        raise ValueError(f"scale_gamma must be > 0 or None, got {c.scale_gamma}")
    if not isinstance(c.solver_options, dict):
        raise TypeError(f"solver_options must be a dict, got {type(c.solver_options).__name__}")


def _regex_or_all_linear(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"target_modules regex {pattern!r} does not compile: {err}") from None
    if not pattern:
        raise ValueError("target_modules must be non-empty")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass
class LoraFactors:
    """LoRA-DA factors of one layer, in the paper's orientation, float32 on CPU.

    Attributes:
        A: (d_in, r), column-orthonormal up to the γ scaling. PEFT: ``lora_A.weight = Aᵀ``.
        B: (r, d_out). PEFT: ``lora_B.weight = Bᵀ``.
        eigenvalues: (r,) the r smallest eigenvalues of Ω found by the solver.
        diagnostics: solver residual / iterations / fallback reason, damping used, token count...
    """

    A: torch.Tensor
    B: torch.Tensor
    eigenvalues: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
