"""``python -m lora_da_ref ...`` is the ``lora-da`` command line (see :mod:`lora_da_ref.cli.main`)."""

import sys

from lora_da_ref.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
