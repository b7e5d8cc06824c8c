"""Vendored data files, shipped as package data; read them through :mod:`lora_da_ref.real`.

``gsm8k_test.jsonl``: the GSM8K test split (source, licence and sha256 in ``README.md`` here).
"""
