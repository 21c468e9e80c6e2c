"""3D variability (SPHIRE ``sx3dvariability``): per-particle angular groups, 2D statistics, reconstruction.

Public API: :class:`VariabilityParams` (+ :func:`from_sphire_options`), :func:`variability` (tables
and images in memory) and :class:`VariabilityResult`; files and output directories are handled by
:func:`isavar.workflows.variability.run_variability`.
"""

from isavar.variability.params import VariabilityParams, from_sphire_options
from isavar.variability.result import VariabilityResult
from isavar.variability.run import variability

__all__ = ["VariabilityParams", "VariabilityResult", "from_sphire_options", "variability"]
