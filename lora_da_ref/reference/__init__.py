"""The exact NumPy/SciPy reference of LoRA-DA's theory (Theorems 4.1/4.2, Sections 2–4 and
Appendix C): the dense Fisher, the guidance matrix Ω and the Fisher–gradient (Eqs. 13, 16–21),
the eigen-solution (Eqs. 5–8), the objective and its bound (Eqs. 11, 23–27, 43–48), the
initialisers (Eq. 17, baselines, ablations) and synthetic models with an exact population Fisher.

It imports no torch. ``lora_da_ref`` re-exports its public names (``from lora_da_ref import
lora_da_init``); ``python -m proofs_check`` checks every proof step with it (docs/theory.md).
"""
