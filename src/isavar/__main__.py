"""Allow ``python -m isavar``."""

import sys

from isavar.cli import main

sys.exit(main())
