"""``python -m proofs_check`` (see :mod:`proofs_check.cli`)."""

from __future__ import annotations

import sys

from proofs_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
