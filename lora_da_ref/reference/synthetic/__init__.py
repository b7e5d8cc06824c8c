"""Synthetic GLMs with an exact population Fisher (the testbed of Theorems 4.1 and 4.2).

Every model draws ``x`` uniformly from a fixed, seeded, non-Gaussian and anisotropic *design pool*
(:func:`design_pool`), so ``J(W) = E_x E_{y|x}[s sᵀ]`` is an exact finite average (closed form in
``y | x``), and ``y ~ p(y | x; W)`` with logits/mean ``f = Wᵀx``, ``W`` of shape ``(d1, d2)``.
"""

from lora_da_ref.reference.linalg import kron_average
from lora_da_ref.reference.synthetic.inputs import InputKind, design_pool
from lora_da_ref.reference.synthetic.linear_gaussian import LinearGaussian
from lora_da_ref.reference.synthetic.logistic import LogisticRegression
from lora_da_ref.reference.synthetic.mle import ConvergenceError, newton_constrained_mle
from lora_da_ref.reference.synthetic.model import SyntheticModel
from lora_da_ref.reference.synthetic.softmax import SoftmaxRegression

__all__ = [
    "ConvergenceError",
    "InputKind",
    "LinearGaussian",
    "LogisticRegression",
    "SoftmaxRegression",
    "SyntheticModel",
    "design_pool",
    "kron_average",
    "newton_constrained_mle",
]
