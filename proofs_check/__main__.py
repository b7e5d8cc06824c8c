"""``python -m proofs_check``: placeholder until the claims land (see issue "proofs_check")."""

from __future__ import annotations

import sys


def main() -> int:
    print("proofs_check: no claims registered yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
