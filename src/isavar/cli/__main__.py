"""Allow ``python -m isavar.cli``."""

import sys

from isavar.cli import main

sys.exit(main())
