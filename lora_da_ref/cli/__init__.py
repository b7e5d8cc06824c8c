"""The ``lora-da`` command line and its helpers: :mod:`.main` (``init``, ``plan``, ``report``,
``validate``), :mod:`.checks` (inputs checked before torch loads), :mod:`.jsonl` (calibration
files), :mod:`.plan` (cost and signal before an init), :mod:`.report` (an adapter's per-layer
diagnostics) and :mod:`.validate` (``python -m lora_da_ref.cli.validate``). Imports nothing
heavy: ``--help`` and bad flags answer before torch loads."""
