"""Allow ``python -m isavar.cli``."""

from isavar.cli import main

raise SystemExit(main())
