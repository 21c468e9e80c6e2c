"""EM for probabilistic PCA with a projection + CTF operator: pure array stages.

Model (``../shared/specs/covariance.md``): the Fourier samples of image ``i`` are
``X_i = C_i S_i (mu + sum_k z_ik V_k) + e_i`` with ``z_i ~ N(0, I_K)`` and complex white
noise per shell, ``E|e(k)|^2 = sigma^2(|k|)``. Each unique half-plane sample stands for
itself and its Hermitian partner (:attr:`SliceSampler.multiplicity`).

E-step (per image): ``A_i = C_i S_i V`` ``(S, K)``, ``M_i = I + Re(A_i^H W A_i)``,
``E[z_i] = M_i^-1 Re(A_i^H W R_i)``, ``Cov[z_i] = M_i^-1`` with ``W = diag(m / sigma^2)`` and
``R_i = X_i - C_i S_i mu``.

M-step (per Fourier voxel ``xi``, the reconstructor's trilinear back-projection):
``(sum w |C|^2/sigma^2 E[zz^T] + diag(1/tau^2(|xi|))) V(xi) = sum w C T/sigma^2 E[z]``.
When the mean is estimated jointly, the latent vector is augmented with a constant 1
(``z_0 = 1``, component 0 = ``mu``) and the target ``T`` is ``X``; with a fixed mean the
target is the residual ``R``. The sums are kept separately for two half sets (even / odd
particles); the per-shell correlation of the two half-set solutions gives the prior
(``H_kk / SSNR``, :func:`solve_voxels`), as RELION's tau^2 comes from the half-set FSC.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "pair_index",
    "posterior",
    "batch_factors",
    "batch_moments",
    "solve_voxels",
    "orthogonalise",
    "covariance_change",
    "sign_by_skew",
]


#: Half-set correlations are clipped to [0, MAX_FSC] before conversion to an SNR.
MAX_FSC = 0.999

#: Ridge relative to the mean normal-matrix diagonal of the voxel's shell.
SHELL_RIDGE = 1e-2

#: Smallest SNR used in the prior (a shell whose half sets do not agree is set to ~0).
MIN_SSNR = 1e-6


def pair_index(j: int) -> list[tuple[int, int]]:
    """Upper-triangle pairs ``(a, b)``, ``a <= b``, of a ``j x j`` symmetric matrix (row-major)."""
    return [(a, b) for a in range(j) for b in range(a, j)]


def posterior(a: np.ndarray, r: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior of the latents of a batch of images.

    Parameters
    ----------
    a : numpy.ndarray
        ``(c, S, K)`` complex: CTF times projected components at the samples.
    r : numpy.ndarray
        ``(c, S)`` complex residuals ``X - C S mu``.
    w : numpy.ndarray
        ``(S,)`` float sample weights ``m / sigma^2``.

    Returns
    -------
    ez : numpy.ndarray
        ``(c, K)`` float64 posterior means.
    cov : numpy.ndarray
        ``(c, K, K)`` float64 posterior covariances ``M^-1``.
    """
    c, _, k = a.shape
    aw = a * w[None, :, None]
    ah = np.conj(aw).transpose(0, 2, 1)  # (c, K, S)
    m = (ah @ a).real.astype(np.float64) + np.eye(k)[None]
    y = (ah @ r[:, :, None]).real[:, :, 0].astype(np.float64)
    cov = np.linalg.inv(m)
    cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    ez = np.einsum("cab,cb->ca", cov, y)
    return ez, cov


def batch_factors(x, ctf, proj, sigma2_s, multiplicity, *, mean_free: bool):
    """E-step of one batch and the factors of the per-sample quantities the M-step back-projects.

    The M-step sums are ``u[i, s] zz[i, p]`` (real, the pairs of :func:`pair_index`) and
    ``g[i, s] zhat[i, a]`` (complex): :func:`batch_moments` forms them, the compiled
    back-projection (:func:`isavar.covariance._kernels.scatter_moments`) multiplies on the fly.

    Parameters
    ----------
    x : numpy.ndarray
        ``(c, S)`` complex64 image samples.
    ctf : numpy.ndarray or None
        ``(c, S)`` float32 CTF at the samples (None = 1).
    proj : numpy.ndarray
        ``(c, S, 1 + K)`` complex64 central-slice samples of ``mu`` (column 0) and ``V_k``.
    sigma2_s : numpy.ndarray
        ``(S,)`` noise power of each sample.
    multiplicity : numpy.ndarray
        ``(S,)`` Hermitian multiplicity.
    mean_free : bool
        Augment the latents with ``z_0 = 1`` (mean estimated jointly).

    Returns
    -------
    ez : numpy.ndarray
        ``(c, K)`` posterior means.
    u : numpy.ndarray
        ``(c, S)`` float32 ``|C|^2 / sigma^2``.
    zz : numpy.ndarray
        ``(c, P)`` float64 ``E[z_a z_b]`` for the pairs of :func:`pair_index` (augmented latents).
    g : numpy.ndarray
        ``(c, S)`` complex64 ``C T / sigma^2`` (``T = X`` with ``mean_free``, else ``R``).
    zhat : numpy.ndarray
        ``(c, J)`` float64 ``E[z]`` (augmented latents).
    err2 : numpy.ndarray
        ``(S,)`` float64 sum over the batch of ``E|R - A z|^2`` (for the noise update).
    """
    c, s, v = proj.shape
    k = v - 1
    cp = proj if ctf is None else proj * ctf[:, :, None]
    r = x - cp[:, :, 0]
    a = cp[:, :, 1:]
    if k:
        ez, cov = posterior(a, r, (multiplicity / sigma2_s).astype(np.float32))
        fit = r - np.einsum("csk,ck->cs", a, ez.astype(np.complex64))
        quad = np.einsum("csa,cab,csb->cs", np.conj(a), cov.astype(np.complex64), a).real
        err2 = (np.abs(fit) ** 2 + quad).sum(axis=0, dtype=np.float64)
    else:
        ez, cov = np.zeros((c, 0)), np.zeros((c, 0, 0))
        err2 = (np.abs(r) ** 2).sum(axis=0, dtype=np.float64)
    ezz = cov + ez[:, :, None] * ez[:, None, :]
    if mean_free:
        zhat = np.concatenate([np.ones((c, 1)), ez], axis=1)
        zz = np.zeros((c, k + 1, k + 1))
        zz[:, 0, 0] = 1.0
        zz[:, 0, 1:] = zz[:, 1:, 0] = ez
        zz[:, 1:, 1:] = ezz
        target = x
    else:
        zhat, zz, target = ez, ezz, r
    inv = (1.0 / sigma2_s).astype(np.float32)
    u = inv[None, :] if ctf is None else ctf * ctf * inv[None, :]
    u = np.ascontiguousarray(np.broadcast_to(u, (c, s)), dtype=np.float32)
    g = np.ascontiguousarray((target if ctf is None else target * ctf) * inv[None, :], dtype=np.complex64)
    ia, ib = np.array(pair_index(zhat.shape[1]), dtype=np.int64).reshape(-1, 2).T
    zz_pairs = np.ascontiguousarray(zz[:, ia, ib], dtype=np.float64)
    return ez, u, zz_pairs, g, np.ascontiguousarray(zhat, dtype=np.float64), err2


def batch_moments(x, ctf, proj, sigma2_s, multiplicity, *, mean_free: bool):
    """E-step of one batch and the per-sample quantities the M-step back-projects (formed).

    Parameters as :func:`batch_factors`.

    Returns
    -------
    ez : numpy.ndarray
        ``(c, K)`` posterior means.
    h_vals : numpy.ndarray
        ``(P, c, S)`` float32 ``|C|^2/sigma^2 E[z_a z_b]`` for the pairs of :func:`pair_index`.
    b_vals : numpy.ndarray
        ``(J, c, S)`` complex64 ``C T / sigma^2 E[z_a]``.
    err2 : numpy.ndarray
        ``(S,)`` float64 sum over the batch of ``E|R - A z|^2`` (for the noise update).
    """
    ez, u, zz, g, zhat, err2 = batch_factors(x, ctf, proj, sigma2_s, multiplicity, mean_free=mean_free)
    h_vals = (u[None] * zz.T[:, :, None].astype(np.float32)).astype(np.float32)
    b_vals = (g[None] * zhat.T[:, :, None].astype(np.float32)).astype(np.complex64)
    return ez, h_vals, b_vals, err2


def _unpack(h: np.ndarray, j: int) -> np.ndarray:
    """``(P, n)`` upper-triangle sums -> ``(n, j, j)`` symmetric matrices."""
    n = h.shape[1]
    out = np.empty((n, j, j), dtype=np.float64)
    for p, (a, b) in enumerate(pair_index(j)):
        out[:, a, b] = h[p]
        out[:, b, a] = h[p]
    return out


def _ridge_solve(hm, bm, shell, n_shells, *, ridge=1e-6, extra=None):
    """Solve ``(H + ridge + extra) v = b`` at every voxel: ``hm`` (n, J, J), ``bm`` (J, n) -> (J, n)."""
    j = hm.shape[1]
    scale = np.trace(hm, axis1=1, axis2=2) / j
    # Voxels far less sampled than their shell (band corners) are damped towards 0.
    counts = np.maximum(np.bincount(shell, minlength=n_shells), 1)
    typical = np.bincount(shell, scale, minlength=n_shells) / counts
    reg = np.maximum(ridge * scale, np.maximum(SHELL_RIDGE * typical[shell], 1e-30))
    mat = hm + reg[:, None, None] * np.eye(j)[None]
    if extra is not None:
        mat = mat + extra
    return _solve_many(mat, bm.T)


def _solve_many(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(n, J, J)`` symmetric matrices, ``(n, J)`` right-hand sides -> ``(J, n)`` solutions.

    Compiled Cholesky per voxel (:func:`isavar.covariance._kernels.spd_solve`; LAPACK's batched solve
    spends most of its time in per-matrix overhead for J <= 7); LU where a matrix is not positive definite.
    """
    from isavar.covariance._kernels import spd_solve

    mat = np.ascontiguousarray(mat, dtype=np.float64)
    rhs = np.ascontiguousarray(rhs, dtype=np.complex128)
    out = np.zeros_like(rhs)
    bad = spd_solve(mat, rhs, out)
    if bad.any():
        out[bad] = np.linalg.solve(mat[bad], rhs[bad][:, :, None])[:, :, 0]
    return out.T


def procrustes(va: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """Orthogonal ``R`` (J, J) minimising ``||va - R vb||`` for coefficient sets ``(J, n)`` (complex)."""
    m = (va @ np.conj(vb).T).real
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def _rotate_sums(h: np.ndarray, b: np.ndarray, r: np.ndarray):
    """Sums of a half set expressed in rotated latents: ``H -> R H R^T``, ``b -> R b``."""
    return np.einsum("ab,nbc,dc->nad", r, h, r), r @ b


def half_fsc(va: np.ndarray, vb: np.ndarray, weight: np.ndarray, shell: np.ndarray, n_shells: int) -> np.ndarray:
    """Per-shell correlation of two coefficient sets ``(J, n)``, weighted per voxel by ``weight`` (J, n)."""
    j = va.shape[0]
    fsc = np.zeros((j, n_shells))
    for a in range(j):
        w = weight[a]
        cross = np.bincount(shell, w * (np.conj(va[a]) * vb[a]).real, minlength=n_shells)
        pa = np.bincount(shell, w * np.abs(va[a]) ** 2, minlength=n_shells)
        pb = np.bincount(shell, w * np.abs(vb[a]) ** 2, minlength=n_shells)
        den = np.sqrt(pa * pb)
        fsc[a] = np.where(den > 0, cross / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(fsc, 0.0, MAX_FSC)


def _wiener_term(hm: np.ndarray, ssnr: np.ndarray, shell: np.ndarray) -> np.ndarray:
    """Diagonal prior ``H_aa / SSNR_a(shell)`` at every voxel: (n, J, J)."""
    j = hm.shape[1]
    diag = np.einsum("njj->nj", hm)
    inv = 1.0 / np.maximum(ssnr, MIN_SSNR)
    extra = np.zeros_like(hm)
    extra[:, np.arange(j), np.arange(j)] = diag * inv[:, shell].T
    return extra


def solve_voxels(h_halves, b_halves, shell, n_shells, *, align: bool = True, first_fixed: bool = False,
                 halves: bool = True):
    """Per-voxel solves of two independent half sets and of their union, with a half-set Wiener prior.

    The half-set solutions without prior are compared (after rotating half B's latents
    onto half A's by orthogonal Procrustes, ``align``) shell by shell; their correlation
    gives ``SSNR = FSC / (1 - FSC)`` for a half and ``2 FSC / (1 - FSC)`` for the union
    (as RELION's tau^2 from the FSC). The prior of component ``a`` at voxel ``xi`` is
    ``H_aa(xi) / SSNR_a(shell)``: a Wiener filter ``SSNR / (1 + SSNR)`` per component,
    independent of the components' scale, ~0 where the halves disagree.

    Parameters
    ----------
    h_halves : numpy.ndarray
        ``(2, P, n)`` real normal-matrix sums (pairs of :func:`pair_index`) of the halves.
    b_halves : numpy.ndarray
        ``(2, J, n)`` complex right-hand sides.
    shell : numpy.ndarray
        ``(n,)`` integer shell of each voxel.
    n_shells : int
        Number of shells.
    align : bool
        Rotate half B onto half A (components; off for the mean).
    first_fixed : bool
        Unknown 0 is the mean (latent fixed at 1): it is not rotated.
    halves : bool
        Also return the regularised half-set solutions (else ``a`` and ``b`` are None).

    Returns
    -------
    dict
        ``a``, ``b`` (regularised half solutions, B in A's gauge), ``both`` (union),
        ``fsc`` ``(J, n_shells)``, ``rotation`` (R applied to half B), ``raw`` (the two
        solutions without prior).
    """
    j = b_halves.shape[1]
    ha, hb = _unpack(h_halves[0], j), _unpack(h_halves[1], j)
    ba, bb = b_halves[0], b_halves[1]
    va = _ridge_solve(ha, ba, shell, n_shells)
    vb = _ridge_solve(hb, bb, shell, n_shells)
    r = np.eye(j)
    if align:
        f = 1 if first_fixed else 0
        if j > f:
            r[f:, f:] = procrustes(va[f:], vb[f:])
    hb, bb = _rotate_sums(hb, bb, r)
    vb = r @ vb
    fsc = half_fsc(va, vb, np.einsum("njj->jn", ha + hb), shell, n_shells)
    half_ssnr = fsc / (1.0 - fsc)
    a = b = None
    if halves:
        a = _ridge_solve(ha, ba, shell, n_shells, extra=_wiener_term(ha, half_ssnr, shell))
        b = _ridge_solve(hb, bb, shell, n_shells, extra=_wiener_term(hb, half_ssnr, shell))
    ht = ha + hb
    both = _ridge_solve(ht, ba + bb, shell, n_shells, extra=_wiener_term(ht, 2.0 * half_ssnr, shell))
    return {"a": a, "b": b, "both": both, "fsc": fsc, "rotation": r, "raw": (va, vb)}


def orthogonalise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate components to orthogonal ones sorted by eigenvalue (``V V^T`` restricted to the span).

    Parameters
    ----------
    v : numpy.ndarray
        ``(K, ...)`` real components.

    Returns
    -------
    w : numpy.ndarray
        ``(K, ...)`` components ``Q^T V`` with ``<w_a, w_b> = 0`` for ``a != b``.
    eigenvalues : numpy.ndarray
        ``(K,)`` ``||w_k||^2``, descending (sum over voxels of the variance along ``w_k``).
    q : numpy.ndarray
        ``(K, K)`` orthogonal matrix; latents transform as ``z' = Q^T z``.
    """
    k = v.shape[0]
    flat = v.reshape(k, -1).astype(np.float64)
    g = flat @ flat.T
    lam, q = np.linalg.eigh(g)
    order = np.argsort(lam)[::-1]
    lam, q = np.maximum(lam[order], 0.0), q[:, order]
    w = (q.T @ flat).reshape(v.shape)
    return w.astype(np.float32), lam, q


def covariance_change(v_old: np.ndarray, v_new: np.ndarray) -> float:
    """``||V' V'^T - V V^T||_F / ||V' V'^T||_F`` for components ``(K, ...)`` (0 = same covariance).

    Weighted by the eigenvalues, so components at the noise level (whose direction is
    arbitrary) do not hold convergence back.
    """
    a = v_old.reshape(v_old.shape[0], -1).astype(np.float64)
    b = v_new.reshape(v_new.shape[0], -1).astype(np.float64)
    gaa, gbb, gab = a @ a.T, b @ b.T, a @ b.T
    diff2 = (gaa**2).sum() + (gbb**2).sum() - 2.0 * (gab**2).sum()
    ref = (gbb**2).sum()
    return float(np.sqrt(max(diff2, 0.0) / ref)) if ref > 0 else 0.0


def sign_by_skew(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signs (+-1 per component) giving each latent a positive skew (else a positive largest voxel).

    Parameters
    ----------
    z : numpy.ndarray
        ``(n, K)`` latents.
    v : numpy.ndarray
        ``(K, ...)`` components.

    Returns
    -------
    numpy.ndarray
        ``(K,)`` float signs.
    """
    k = v.shape[0]
    signs = np.ones(k)
    for a in range(k):
        t = z[:, a] - z[:, a].mean()
        sd = t.std()
        skew = float(np.mean(t**3) / sd**3) if sd > 0 else 0.0
        if abs(skew) > 0.05:
            signs[a] = np.sign(skew)
        else:
            flat = v[a].ravel()
            signs[a] = 1.0 if flat[np.argmax(np.abs(flat))] >= 0 else -1.0
    return signs
