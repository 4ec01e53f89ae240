"""`python -m covshift`: the covshift command."""

import sys

from covshift.cli import main

if __name__ == "__main__":
    sys.exit(main())
