"""3D variability analysis by a low-rank covariance model (PPCA with projections), on tables and lazy images.

Passes over the data (each one ``executor.map_sum`` over fixed chunks of consecutive
particles: the chunk sums are added exactly in fixed point, :mod:`isavar.parallel.reduction`,
so the answer is the same bit for bit for any executor, worker or rank count, with one
reduction per pass under MPI): one pass for the mean (a Wiener reconstruction, the 0-component case of the
same code), then ``iterations`` EM passes (E-step per image, back-projection of the
M-step sums), then one pass for the final latents. Memory: the accumulators
(``2 (P + J)`` arrays over the Fourier band of the padded grid) and one chunk of
images; nothing grows with the number of particles except the table and the latents.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from isavar._progress import NullProgress
from isavar.core.geometry import symmetry_matrices
from isavar.core.masks import circular_mask
from isavar.core.normalize import normalize_images
from isavar.covariance import em
from isavar.covariance.sampling import SliceSampler
from isavar.covariance.volumes import apply_profile, auto_mask, band_limit, lowpass_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CovarianceParams:
    """Settings of the covariance (3D variability analysis) EM.

    Attributes
    ----------
    n_components : int
        ``K``, number of components (1-6 is typical).
    iterations : int
        Largest number of EM iterations.
    tolerance : float
        Stop when the relative change of the covariance ``V V^T`` between iterations
        (Frobenius norm) is below this.
    ctf : bool
        Model the CTF of each particle (``X = C S V``; data are not phase flipped).
    lowpass_fl, lowpass_aa : float
        tanh low-pass of the components (cycles/pixel; 0 = off); also limits the
        Fourier samples used (where the filter is below 1e-3).
    symmetry : str
        Point group imposed on the mean only (the mean is then fixed after the first pass).
    normalize : bool
        Background normalisation: each image's mean outside the disc of radius ``N // 2 - 2``
        is subtracted and all images are divided by one global background standard
        deviation (the median over images), so that ``var3D`` is on the scale of
        ``3dvariability``'s (noise standard deviation 1) without per-image scale jitter.
    npad : int
        Padding of the 3D Fourier grid.
    chunk_size : int
        Particles per task (fixed: results do not depend on the number of workers).
    batch_size : int
        Particles per vectorised batch inside a task.
    seed : int
        Seed of the random initial components.
    mask_threshold : float
        Automatic mask: fraction of the low-passed mean's maximum.
    mask_dilate_px, mask_soft_px : float
        Automatic mask: dilation and soft edge (pixels).
    init_scale : float
        Norm of each random initial component relative to the mean's norm.
    auto_band : bool
        Limit the EM to the frequencies where the two half-set means still agree
        (FSC >= 0.143, plus 2 shells): components cannot be resolved beyond the mean,
        and the cost falls with the number of samples.
    """

    n_components: int = 2
    iterations: int = 20
    tolerance: float = 2e-3
    ctf: bool = False
    lowpass_fl: float = 0.0
    lowpass_aa: float = 0.0
    symmetry: str = "c1"
    normalize: bool = True
    npad: int = 2
    chunk_size: int = 512
    batch_size: int = 256
    seed: int = 0
    mask_threshold: float = 0.1
    mask_dilate_px: float = 3.0
    mask_soft_px: float = 3.0
    init_scale: float = 0.5
    auto_band: bool = True

    def to_dict(self) -> dict:
        """Plain dictionary (for provenance and summaries)."""
        return asdict(self)


@dataclass(frozen=True)
class CovarianceResult:
    """Arrays of a finished covariance analysis (writing is the workflow's job).

    Attributes
    ----------
    mean : numpy.ndarray
        ``(N, N, N)`` mean volume (image units after normalisation).
    components : numpy.ndarray
        ``(K, N, N, N)`` orthogonal components ``V_k`` (unit-variance latents), by eigenvalue.
    eigenvalues : numpy.ndarray
        ``(K,)`` ``||V_k||^2`` (sum over voxels), descending.
    latents : numpy.ndarray
        ``(n, K)`` posterior means ``E[z_i]`` for the final components, input order.
    var3d : numpy.ndarray
        ``(N, N, N)`` standard-deviation map ``sqrt(sum_k V_k^2)``.
    mask : numpy.ndarray
        ``(N, N, N)`` real-space mask applied to the components.
    half_correlation : numpy.ndarray
        ``(K,)`` correlation of each component between the two half sets (last M-step).
    noise_eigenvalues : numpy.ndarray
        ``(K,)`` eigenvalue a component of pure noise would have (half-set difference).
    half_snr : numpy.ndarray
        ``(K,)`` energy of the half-set sum over that of the difference (about 1 for noise).
    sigma2 : numpy.ndarray
        Noise power per shell (image Fourier units).
    history : list of dict
        Per iteration: covariance change, eigenvalues, mean half-set FSC, noise, seconds.
    timings_s : dict
        Wall time per stage.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    latents: np.ndarray
    var3d: np.ndarray
    mask: np.ndarray
    half_correlation: np.ndarray
    noise_eigenvalues: np.ndarray
    half_snr: np.ndarray
    sigma2: np.ndarray
    history: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    converged: bool = False

    def eigenvalue_trend(self) -> np.ndarray:
        """``(K,)`` ratio of each eigenvalue in the last EM iteration to the one before (1 if unknown).

        EM for PPCA lets a direction whose data variance does not exceed the noise decay
        geometrically towards 0 (Tipping & Bishop 1999); a component held up by the data
        keeps its eigenvalue (ratio ~1).
        """
        k = self.components.shape[0]
        if len(self.history) < 2:
            return np.ones(k)
        a = np.asarray(self.history[-1]["eigenvalues"], np.float64)
        b = np.asarray(self.history[-2]["eigenvalues"], np.float64)
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)

    def above_noise(self) -> np.ndarray:
        """``(K,)`` bool: eigenvalue sustained by the data (trend >= :data:`SUSTAINED`) and the
        half-set sum/difference energy ratio above :data:`SIGNIFICANCE`."""
        return (self.eigenvalue_trend() >= SUSTAINED) & (self.half_snr > SIGNIFICANCE)

    def summary(self) -> dict:
        """JSON-friendly figures."""
        return {
            "n_components": int(self.components.shape[0]),
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "half_set_correlation": [float(x) for x in self.half_correlation],
            "noise_eigenvalues": [float(x) for x in self.noise_eigenvalues],
            "half_set_snr": [float(x) for x in self.half_snr],
            "eigenvalue_trend": [float(x) for x in self.eigenvalue_trend()],
            "above_noise": [bool(x) for x in self.above_noise()],
            "iterations": len(self.history),
            "converged": bool(self.converged),
            "history": self.history,
            "var3d_max": float(self.var3d.max()),
            "var3d_mean_in_mask": float(self.var3d[self.mask > 0.5].mean()) if np.any(self.mask > 0.5) else 0.0,
            "timings_s": self.timings_s,
        }


#: A component is above the noise level when the energy of its half-set sum exceeds this multiple of
#: the energy of the half-set difference (1 on average for a component made of noise).
SIGNIFICANCE = 3.0

#: Eigenvalues below this fraction of the mean's energy (sum of squares), and shrinking, stop the EM:
#: nothing above the noise level is left (a real domain of 1 % of the mass in half the particles is ~2e-3).
VANISHED = 1e-5

#: Smallest last-iteration eigenvalue ratio of a component held up by the data.
SUSTAINED = 0.9


# --------------------------------------------------------------------------------------
# Tasks (run in worker processes)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    images: object
    rotations: np.ndarray
    origins_px: np.ndarray
    ctf: dict | None
    pixel_size_A: float
    sampler: SliceSampler
    params: CovarianceParams
    background_std: float = 1.0


def _prepare(ctx: _Context, rows: np.ndarray):
    """Normalised image samples and CTF of a batch of rows."""
    x = np.asarray(ctx.images[rows], dtype=np.float32)
    if ctx.params.normalize:
        n = x.shape[-1]
        x = normalize_images(x, circular_mask(n, n // 2 - 2), mean_region="outside", std_region=None)
        x *= np.float32(1.0 / ctx.background_std)
    samples = ctx.sampler.image_samples(x, ctx.origins_px[rows])
    ctf = None
    if ctx.ctf is not None:
        ctf = ctx.sampler.ctf_samples(ctx.pixel_size_A, {k: v[rows] for k, v in ctx.ctf.items()})
    return samples, ctf


def _pass_task(ctx: _Context, stores: np.ndarray, sigma2_s: np.ndarray, mean_free: bool, scatter: bool,
               sym: np.ndarray, rows: np.ndarray):
    """One chunk: E-step (latents, noise sums) and, with ``scatter``, the M-step sums of both half sets.

    Particle ``i`` belongs to half ``i % 2`` and is projected with that half's volumes
    (``stores[i % 2]``), so the two halves are refined independently.

    Returns ``(sums, (rows, latents))`` for :meth:`Executor.map_sum`: ``sums`` is
    ``(h (2, n_band, P) float32, b (2, n_band, J) complex64, err2 (S,))`` with ``scatter``, else
    ``(err2,)``; the chunk's rows and ``(c, K)`` latents stay on the process that computed them.
    """
    sampler, p = ctx.sampler, ctx.params
    k = stores.shape[2] - 1
    j = k + 1 if mean_free else k
    npair = j * (j + 1) // 2
    h = np.zeros((2, sampler.n_band, npair), np.float64) if scatter else None     # voxel-major
    b = np.zeros((2, sampler.n_band, j), np.complex128) if scatter else None
    err2 = np.zeros(sampler.n_samples)
    ez_all = np.zeros((rows.size, k))
    mult = sampler.multiplicity
    blank = not np.any(stores)                          # the mean pass projects nothing: skip the gather
    for s in range(0, rows.size, p.batch_size):
        batch = rows[s:s + p.batch_size]
        x_all, ctf_all = _prepare(ctx, batch)
        for half in (0, 1):
            m = batch % 2 == half
            if not m.any():
                continue
            sel = batch[m]
            x = x_all[m]
            ctf = None if ctf_all is None else ctf_all[m]
            for i_op, op in enumerate(sym):
                rot = ctx.rotations[sel] @ op
                proj = (np.zeros((sel.size, sampler.n_samples, stores.shape[2]), np.complex64) if blank
                        else sampler.gather_at(stores[half], rot))
                ez, u, zz, g, zhat, e2 = em.batch_factors(x, ctf, proj, sigma2_s, mult, mean_free=mean_free)
                if i_op == 0:
                    ez_all[s + np.flatnonzero(m)] = ez
                    err2 += e2
                if scatter:
                    sampler.scatter_moments(u, zz, g, zhat, rot, h[half], b[half])
    sums = (h.astype(np.float32), b.astype(np.complex64), err2) if scatter else (err2,)
    return sums, (rows, ez_all)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


class _Solver:
    """The M-step on the root: accumulated band sums -> volumes (pure arrays)."""

    def __init__(self, sampler: SliceSampler, params: CovarianceParams):
        self.sampler = sampler
        self.params = params
        radius = sampler.fft_radius()
        inside = radius <= sampler.r_max + 1.0
        self.flat = np.flatnonzero(inside.ravel())
        self.shell = np.rint(radius.ravel()[self.flat]).astype(np.int64)
        self.n_shells = int(self.shell.max()) + 1
        self.fft_shape = radius.shape
        self.profile = None
        if params.lowpass_fl > 0:
            self.profile = lowpass_profile(radius / sampler.box, params.lowpass_fl, params.lowpass_aa)

    def voxel_sums(self, h: np.ndarray, b: np.ndarray):
        """Band sums ``(2, P, n_band)``, ``(2, J, n_band)`` -> values at the solve voxels (planes completed)."""
        s = self.sampler
        hv = np.stack([np.stack([s.storage_to_fft(h[i, p], conjugate=False).ravel()[self.flat]
                                 for p in range(h.shape[1])]) for i in range(2)])
        bv = np.stack([np.stack([s.storage_to_fft(b[i, a], conjugate=True).ravel()[self.flat]
                                 for a in range(b.shape[1])]) for i in range(2)])
        return hv, bv

    def noise_at_voxels(self, sigma2_shell: np.ndarray) -> np.ndarray:
        """Noise power at each solve voxel (its shell, clipped to the sampled shells)."""
        return sigma2_shell[np.minimum(self.shell, sigma2_shell.size - 1)]

    def to_volumes(self, coeffs: np.ndarray, *, lowpass: np.ndarray) -> np.ndarray:
        """``(J, n_vox)`` Fourier coefficients -> ``(J, N, N, N)`` volumes (low-pass where ``lowpass``)."""
        out = []
        for a in range(coeffs.shape[0]):
            f = np.zeros(int(np.prod(self.fft_shape)), np.complex64)
            f[self.flat] = coeffs[a]
            f = f.reshape(self.fft_shape)
            if lowpass[a] and self.profile is not None:
                f = apply_profile(f, self.profile)
            out.append(self.sampler.fft_to_volume(f))
        return np.stack(out)


def _initial_components(k: int, box: int, mask: np.ndarray, seed: int, params: CovarianceParams) -> np.ndarray:
    """Random smooth orthonormal components inside the mask."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(13,)))
    v = rng.standard_normal((k, box, box, box)).astype(np.float32)
    sigma = max(1.0, box / 32.0) if params.lowpass_fl <= 0 else max(1.0, 0.15 / params.lowpass_fl)
    v = np.stack([gaussian_filter(x, sigma) for x in v]) * mask[None]
    flat = v.reshape(k, -1).astype(np.float64)
    q = np.linalg.qr(flat.T)[0].T
    return q.reshape(v.shape).astype(np.float32)


def covariance(table: pd.DataFrame, images, params: CovarianceParams, *, geometry, pixel_size_A: float,
               executor=None, progress=None, mask: np.ndarray | None = None,
               mean: np.ndarray | None = None, checkpoint=None, state: dict | None = None) -> CovarianceResult:
    """Low-rank covariance of the 3D density of oriented particles (PPCA by EM).

    Parameters
    ----------
    table : pandas.DataFrame
        Canonical particle table (only its length is used here).
    images : LazyImages or numpy.ndarray
        ``(n, N, N)`` images in table order.
    params : CovarianceParams
        Settings.
    geometry : isavar.variability.run.ParticleGeometry
        Orientations, origins (pixels) and CTF parameters (with ``params.ctf``).
    pixel_size_A : float
        Pixel size (Å).
    executor : Executor, optional
        How chunks are spread (default serial).
    progress : Progress, optional
        Progress reporter.
    mask : numpy.ndarray, optional
        ``(N, N, N)`` mask in ``[0, 1]`` for the components (default: from the mean).
    mean : numpy.ndarray, optional
        ``(N, N, N)`` mean volume to use (fixed) instead of estimating it.
    checkpoint : callable, optional
        Called after every EM iteration with the state dict (see ``state``).
    state : dict, optional
        A state passed to ``checkpoint`` by an earlier, interrupted run with the same
        parameters and data: the run continues after its last iteration and gives the
        same result as an uninterrupted one.

    Returns
    -------
    CovarianceResult
    """
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    n, box = len(images), int(images.shape[-1])
    k = int(params.n_components)
    r_max = band_limit(box, params.lowpass_fl, params.lowpass_aa)
    sampler = SliceSampler(box, r_max, npad=params.npad)
    solver = _Solver(sampler, params)
    bg = background_std(images) if params.normalize else 1.0
    ctx = _Context(images, geometry.rotations, geometry.origins_px, geometry.ctf if params.ctf else None,
                   float(pixel_size_A), sampler, params, bg)
    chunks = [np.arange(s, min(n, s + params.chunk_size)) for s in range(0, n, params.chunk_size)]
    log.info("3dva: %d particles, box %d, K = %d, samples per image %d (radius %.1f px), %s, %d chunks",
             n, box, k, sampler.n_samples, r_max, "CTF" if params.ctf else "no CTF", len(chunks))
    eye = np.eye(3)[None]
    timings = {}

    def run_pass(stage, stores, sigma2_shell, mean_free, scatter, sym=eye, latents=False):
        """One pass over the data: one exact ``map_sum`` (one reduction under MPI) of the chunk sums.

        Returns ``(ez, h, b, sigma2)``: the ``(n, K)`` latents on every process when ``latents``
        (gathered to the root and broadcast: table-sized), else None; the summed band arrays
        (None without ``scatter``); the noise power per shell.
        """
        sig_s = sigma2_shell[sampler.shell].astype(np.float32)
        task = functools.partial(_pass_task, ctx, stores, sig_s, mean_free, scatter, sym)
        mine = []
        share = int(getattr(executor, "size", 1))   # under MPI the root sees its own block only: scale the bar

        def on_result(extra):
            if latents:
                mine.append(extra)
            progress.advance(extra[0].size * share)

        progress.stage(stage, total=n)
        sums = executor.map_sum(task, chunks, on_result=on_result)
        progress.close()
        h, b, err2 = sums if scatter else (None, None, sums[0])
        if scatter:                                  # voxel-major chunk sums -> (2, P, n_band), (2, J, n_band)
            h, b = h.transpose(0, 2, 1), b.transpose(0, 2, 1)
        ez = None
        if latents:                                  # every process calls gather and bcast (collectives)
            parts = executor.gather(mine)
            ez = _assemble_latents(parts, n, stores.shape[2] - 1) if executor.is_root() else None
            ez = executor.bcast(ez)
        counts = np.bincount(sampler.shell, minlength=sampler.n_shells) * float(n)
        sums_shell = np.bincount(sampler.shell, err2, minlength=sampler.n_shells)
        sigma2 = np.where(counts > 0, sums_shell / np.maximum(counts, 1.0), 0.0)
        sigma2 = _fill_shells(sigma2, solver.n_shells)
        return ez, h, b, sigma2

    def both_halves(volumes):
        st = sampler.volumes_to_storage(volumes)
        return np.stack([st, st])

    sym = symmetry_matrices(params.symmetry)
    history = []
    converged = False
    last = None
    t1 = time.perf_counter()
    if state is None:
        # ---- mean (pass 0: the K = 0 model with z_0 = 1; unit noise weights, re-weighted below)
        t0 = time.perf_counter()
        ones = np.ones(solver.n_shells)
        hv0 = bv0 = None
        high = None
        fixed_mean = mean
        if mean is None:
            zero = np.zeros((2, sampler.n_band, 1), np.complex64)
            _, h0, b0, power = run_pass("mean", zero, ones, True, True, sym)
            hv0, bv0 = solver.voxel_sums(h0, b0)
            del h0, b0
            mean, mean_fsc = _solve_mean(solver, hv0, bv0, power)
        mean = np.asarray(mean, np.float32)
        timings["mean"] = time.perf_counter() - t0
        if hv0 is not None and params.auto_band:
            r_auto = _resolved_radius(mean_fsc[0], r_max)
            if r_auto < r_max - 0.5:
                log.info("band limited to %.1f px (FSC of the half-set means >= %.3f; Nyquist %.1f)", r_auto,
                         FSC_BAND, box / 2)
                high = mean - fourier_band(mean, r_auto)
                r_max = r_auto
                sampler = SliceSampler(box, r_max, npad=params.npad)
                solver = _Solver(sampler, params)
                ctx = _Context(ctx.images, ctx.rotations, ctx.origins_px, ctx.ctf, ctx.pixel_size_A, sampler, params,
                               ctx.background_std)
                hv0 = bv0 = None
        given_mask = mask is not None
        if mask is None:
            mask = auto_mask(mean, threshold=params.mask_threshold, dilate_px=params.mask_dilate_px,
                             soft_px=params.mask_soft_px)
        mask = np.asarray(mask, np.float32)
        log.info("mask: %d voxels above 0.5 (%s)", int((mask > 0.5).sum()), "given" if given_mask else "from the mean")
        scale = np.sqrt(max(float((mean.astype(np.float64) ** 2).sum()), 1e-12)) * params.init_scale
        v = _initial_components(k, box, mask, params.seed, params) * np.float32(scale)

        # ---- EM iterations (one set of components; the two half sets give the Wiener prior and the noise level)
        sigma2 = _initial_noise(run_pass, both_halves(mean[None]), solver) if k else ones
        if hv0 is not None:
            mean, _ = _solve_mean(solver, hv0, bv0, sigma2)  # Wiener weights from the residual noise
        mean_free = fixed_mean is None and sym.shape[0] == 1
        first = 1
    else:
        r_max = float(state["band_radius_px"])
        sampler = SliceSampler(box, r_max, npad=params.npad)
        solver = _Solver(sampler, params)
        ctx = _Context(ctx.images, ctx.rotations, ctx.origins_px, ctx.ctf, ctx.pixel_size_A, sampler, params,
                       ctx.background_std)
        mean, v, sigma2, mask = (np.asarray(state[key]) for key in ("mean", "components", "sigma2", "mask"))
        high = state.get("high")
        mean_free = bool(state["mean_free"])
        history = list(state["history"])
        timings.update(state.get("timings", {}))
        first = len(history) + 1
        log.info("resuming after EM iteration %d", first - 1)
    for it in range(first, params.iterations + 1 if k else 1):
        ti = time.perf_counter()
        stores = both_halves(np.concatenate([mean[None], v]))
        _, h, b, sigma2_new = run_pass(f"EM {it}", stores, sigma2, mean_free, True)
        hv, bv = solver.voxel_sums(h, b)
        del h, b
        final = it == params.iterations
        sol = em.solve_voxels(hv, bv, solver.shell, solver.n_shells, first_fixed=mean_free, halves=final)
        f = 1 if mean_free else 0
        lp = np.array([False] * f + [True] * k)
        vols = solver.to_volumes(sol["both"], lowpass=lp)
        if mean_free:
            mean = vols[0]
        v_new, lam, q = em.orthogonalise(vols[f:] * mask[None])
        change = em.covariance_change(v, v_new)
        v = v_new
        sigma2 = sigma2_new
        history.append({"iteration": it, "change": change,
                        "eigenvalues": [float(x) for x in lam],
                        "fsc_mean": [float(x) for x in sol["fsc"][f:].mean(axis=1)],
                        "noise_power_mean": float(np.mean(sigma2)), "seconds": time.perf_counter() - ti})
        log.info("EM %d: change %.2e, eigenvalues %s (%.1f s)", it, change,
                 ", ".join(f"{x:.4g}" for x in lam), time.perf_counter() - ti)
        energy = float((mean.astype(np.float64) ** 2).sum())
        vanished = (it >= 3 and lam.max() < VANISHED * energy and len(history) >= 2
                    and lam.max() < max(history[-2]["eigenvalues"]))
        if vanished:
            log.info("every component is below %.0e of the mean's energy and shrinking: no variability above the "
                     "noise level; stopping", VANISHED)
        if final or vanished or change < params.tolerance:
            converged = change < params.tolerance
            if sol["a"] is None:
                sol = em.solve_voxels(hv, bv, solver.shell, solver.n_shells, first_fixed=mean_free)
            last = (sol["a"][f:], sol["b"][f:], q)
            break
        if checkpoint is not None:  # only iterations that continue: a resumed run repeats nothing
            checkpoint({"iteration": it, "mean": mean, "components": v, "sigma2": sigma2, "mask": mask,
                        "high": high, "band_radius_px": r_max, "mean_free": mean_free, "history": history,
                        "timings": dict(timings)})
    timings["em"] = time.perf_counter() - t1

    # ---- final latents with the union's components
    t2 = time.perf_counter()
    if k:
        z, _, _, _ = run_pass("latents", both_halves(np.concatenate([mean[None], v])), sigma2, False, False,
                              latents=True)
    else:
        z = np.zeros((n, 0))
    signs = em.sign_by_skew(z, v) if k else np.ones(0)
    v = v * signs[:, None, None, None].astype(np.float32)
    z = z * signs[None]
    lam = (v.reshape(k, -1).astype(np.float64) ** 2).sum(axis=1)
    corr, noise_eig, snr_ratio = _half_statistics(solver, last, mask, signs, k)
    timings["latents"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t_start
    var3d = np.sqrt((v.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    if high is not None and mean_free:
        mean = mean + high  # the EM mean is band-limited: beyond the band, the first-pass Wiener mean
    timings["band_radius_px"] = float(r_max)
    return CovarianceResult(mean=mean.astype(np.float32), components=v.astype(np.float32), eigenvalues=lam,
                            latents=z, var3d=var3d, mask=mask, half_correlation=corr, noise_eigenvalues=noise_eig,
                            half_snr=snr_ratio, sigma2=sigma2, history=history, timings_s=timings,
                            converged=converged)


def _assemble_latents(parts, n: int, k: int) -> np.ndarray:
    """``(n, K)`` latents from every process's list of ``(rows, latents)`` chunk results."""
    z = np.zeros((n, k))
    for part in parts:
        for rows, ez in part:
            z[rows] = ez
    return z


def background_std(images, *, max_images: int = 1000) -> float:
    """Median over (up to ``max_images`` evenly spaced) images of the background standard deviation.

    The background is the region outside the disc of radius ``N // 2 - 2`` (as
    ``3dvariability``'s normalisation). One global value keeps the relative scale of the
    images: per-image scaling would add a spurious variability along the mean.
    """
    from isavar.core.normalize import region_stats

    n, box = len(images), int(images.shape[-1])
    rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
    _, std = region_stats(np.asarray(images[rows], np.float32), circular_mask(box, box // 2 - 2), "outside")
    std = np.asarray(std, np.float64)
    std = std[np.isfinite(std) & (std > 0)]
    return float(np.median(std)) if std.size else 1.0


def _fill_shells(sigma2: np.ndarray, n_shells: int) -> np.ndarray:
    """Extend per-shell noise to ``n_shells`` (last sampled value) and keep it positive."""
    out = np.empty(n_shells)
    m = min(n_shells, sigma2.size)
    out[:m] = sigma2[:m]
    out[m:] = sigma2[m - 1] if m else 1.0
    pos = out[out > 0]
    return np.maximum(out, pos.min() if pos.size else 1.0)


def _initial_noise(run_pass, stores, solver):
    """Noise power per shell from the residuals to the mean."""
    _, _, _, sigma2 = run_pass("noise", stores, np.ones(solver.n_shells), False, False)
    return sigma2


def _solve_mean(solver: _Solver, hv0, bv0, noise_shell) -> np.ndarray:
    """Wiener mean from the pass-0 sums (unit weights) re-weighted by the noise power per shell."""
    w = 1.0 / solver.noise_at_voxels(noise_shell)
    sol = em.solve_voxels(hv0 * w[None, None], bv0 * w[None, None], solver.shell, solver.n_shells, align=False)
    return solver.to_volumes(sol["both"], lowpass=np.array([False]))[0], sol["fsc"]


#: FSC of the half-set means that defines the automatic band limit.
FSC_BAND = 0.143


def _resolved_radius(fsc: np.ndarray, r_max: float) -> float:
    """Image-frequency radius where the half-set FSC first drops below :data:`FSC_BAND`, plus 2 (<= r_max)."""
    below = np.flatnonzero(fsc[1:] < FSC_BAND)
    r = float(below[0] + 1) if below.size else r_max
    return float(min(r_max, max(r + 2.0, 4.0)))


def fourier_band(volume: np.ndarray, radius: float) -> np.ndarray:
    """The part of a volume at image-frequency radius <= ``radius`` (sharp Fourier cut, float32)."""
    n = volume.shape[0]
    f = np.fft.rfftn(volume.astype(np.float64))
    fz = np.fft.fftfreq(n, 1.0 / n)
    fx = np.arange(n // 2 + 1)
    r = np.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)
    return np.fft.irfftn(np.where(r <= radius, f, 0), s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def _half_statistics(solver: _Solver, halves, mask, signs, k):
    """Half-set figures of each final component: correlation, noise eigenvalue, their ratio.

    The two independent half-set solutions of the last M-step (Wiener-filtered, half B
    rotated onto half A) are low-passed, masked and rotated/signed like the final components. Then ``noise_k = ||(A_k - B_k) / 2||^2``
    is the eigenvalue a component made of noise alone would have (the half-difference has
    no signal), and ``||(A_k + B_k) / 2||^2 / noise_k`` is about 1 for pure noise.
    """
    if not k or halves is None:
        return np.zeros(k), np.zeros(k), np.zeros(k)
    va, vb, q = halves
    lowpass = np.ones(k, bool)
    a = solver.to_volumes(va, lowpass=lowpass) * mask[None]
    b = solver.to_volumes(vb, lowpass=lowpass) * mask[None]
    a = (q.T @ a.reshape(k, -1).astype(np.float64)) * signs[:, None]
    b = (q.T @ b.reshape(k, -1).astype(np.float64)) * signs[:, None]
    corr = np.zeros(k)
    noise = np.zeros(k)
    ratio = np.zeros(k)
    for i in range(k):
        x, y = a[i], b[i]
        denom = np.sqrt((x * x).sum() * (y * y).sum())
        corr[i] = (x * y).sum() / denom if denom > 0 else 0.0
        noise[i] = (((x - y) / 2.0) ** 2).sum()
        signal = (((x + y) / 2.0) ** 2).sum()
        ratio[i] = signal / noise[i] if noise[i] > 0 else 0.0
    return corr, noise, ratio
