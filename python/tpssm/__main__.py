"""`python -m tpssm ...`: see tpssm.cli."""

import sys

from tpssm.cli import main

if __name__ == "__main__":
    sys.exit(main())
