"""paper_figs — the paper's figures and tables at small scale, from real runs."""
