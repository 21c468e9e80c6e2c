"""isavar: fast, validated ISAC2 2D classification and 3D variability for cryo-EM.

The package has no side effects at import: no logging configuration, no MPI,
no directories. Command-line use goes through :func:`isavar.cli.main`.
"""

from isavar._version import __version__

__all__ = ["__version__"]
