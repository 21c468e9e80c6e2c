"""3D variability by a consistent low-rank covariance model (probabilistic PCA with projections, EM).

See ``docs/covariance.md``. Stages: :mod:`~isavar.covariance.sampling` (Fourier samples
of oriented images, gather/scatter on the reconstructor's padded grid),
:mod:`~isavar.covariance.em` (E-step, per-voxel M-step with a half-set Wiener prior,
orthogonalisation, signs), :mod:`~isavar.covariance.run` (the passes over the data).
"""

from isavar.covariance.run import CovarianceParams, CovarianceResult, covariance

__all__ = ["CovarianceParams", "CovarianceResult", "covariance"]
