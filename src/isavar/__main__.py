"""Allow ``python -m isavar``."""

from isavar.cli import main

raise SystemExit(main())
