"""`python -m pipeline`: the command line of pipeline.cli.main (also installed as `dpo-ray`)."""

import sys

from pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
