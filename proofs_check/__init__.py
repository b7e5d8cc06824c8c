"""proofs_check — every step of LoRA-DA's theory as a numerical check that can fail."""
