"""Within-group stability: randomised reference-free alignments and the pixel-error test.

Spec isac2 §6.4-§6.6. A class is *stable* for the members whose alignment
parameters agree across ``stab_ali`` independent randomised reference-free
alignments of the class, once the runs are brought into a common frame; the
disagreement is measured as a pixel error at the particle radius.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize


@dataclass(frozen=True)
class StabilityResult:
    """Outcome of :func:`multi_align_stability` for one group.

    Attributes
    ----------
    stable : ndarray of int, (n_stable,)
        Positions (0-based, into the group's member list) of the stable members, ascending.
    errors : ndarray of float, (n_stable,)
        Their pixel errors (pixels).
    params : ndarray of float64, (n_stable, 4)
        Stability-averaged parameters ``(alpha, sx, sy, mirror)`` in the frame of the last run.
    mirror_rate : float
        Fraction of members with consistent mirror flags across runs.
    pixel_error : float
        RMS pixel error over the mirror-consistent members before pruning (SPHIRE's reported value, Q25).
    """

    stable: np.ndarray
    errors: np.ndarray
    params: np.ndarray
    mirror_rate: float
    pixel_error: float


def _empty(n_ms: int, n: int, prever: float = np.inf) -> StabilityResult:
    return StabilityResult(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)),
                           n_ms / max(n, 1), float(prever))


def mirror_consistent(mirrors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Members whose mirror flags agree across runs up to one flip per run.

    Parameters
    ----------
    mirrors : ndarray of int, (L, n)
        Mirror flag of each member in each run.

    Returns
    -------
    members : ndarray of bool, (n,)
        True for members consistent with the best flip pattern.
    flips : ndarray of int, (L,)
        The flip of each run relative to the first (``flips[0] = 0``).
    """
    mirrors = np.asarray(mirrors, dtype=np.int64)
    n_runs = mirrors.shape[0]
    best, best_count = None, -1
    for pattern in itertools.product((0, 1), repeat=n_runs - 1):
        flips = np.array((0,) + pattern)
        flipped = mirrors ^ flips[:, None]
        ok = np.all(flipped == flipped[0], axis=0)
        if ok.sum() > best_count:
            best, best_count = (ok, flips), int(ok.sum())
    return best


def _transformed(params: np.ndarray, g: np.ndarray):
    """Apply the run transforms ``G_j`` (no mirror) after each run's parameters.

    params : (L, n, 4); g : (L, 3) = (alpha_j deg, x_j, y_j). Returns theta (rad) and u (L, n, 2).
    """
    a, tx, ty, m = params[..., 0], params[..., 1], params[..., 2], params[..., 3]
    sign = np.where(m > 0.5, -1.0, 1.0)
    ga = np.deg2rad(g[:, 0])[:, None]
    theta = np.deg2rad(a) + sign * ga
    c, s = np.cos(sign * ga), np.sin(sign * ga)
    ux = c * tx + s * ty + sign * g[:, 1:2]
    uy = -s * tx + c * ty + g[:, 2:3]
    return theta, ux, uy


def pixel_errors_squared(params: np.ndarray, g: np.ndarray, diameter: float) -> np.ndarray:
    """Per-member squared pixel error across runs (spec §6.6 step 3).

    Parameters
    ----------
    params : ndarray, (L, n, 4)
        ``(alpha deg, sx, sy, mirror)`` of every member in every run (mirrors already made consistent).
    g : ndarray, (L, 3)
        Rotation (deg) and shift bringing each run into the last run's frame (``g[-1] = 0``).
    diameter : float
        Particle diameter ``d`` (pixels); the angular spread is converted at radius ``d/2``.

    Returns
    -------
    ndarray, (n,)
        ``max(0, (d^2/4)(1 - |sum_j exp(i theta_j)|/L) + Var_j(u_x) + Var_j(u_y))``.
    """
    theta, ux, uy = _transformed(params, g)
    n_runs = params.shape[0]
    resultant = np.hypot(np.cos(theta).sum(0), np.sin(theta).sum(0))
    e2 = diameter ** 2 / 4.0 * (1.0 - resultant / n_runs) + ux.var(axis=0) + uy.var(axis=0)
    return np.maximum(e2, 0.0)


def mean_error_and_gradient(params: np.ndarray, g: np.ndarray, diameter: float) -> tuple[float, np.ndarray]:
    """Mean over members of :func:`pixel_errors_squared` and its gradient with respect to ``g``.

    Parameters
    ----------
    params : ndarray, (L, n, 4)
        As :func:`pixel_errors_squared`.
    g : ndarray, (L, 3)
        Run transforms (degrees, pixels).
    diameter : float

    Returns
    -------
    value : float
        ``mean_i e_i^2`` (without the clamp at 0, which only rounding reaches).
    gradient : ndarray, (L, 3)
        Derivatives with respect to ``g`` (per degree for the angles, per pixel for the shifts).
    """
    theta, ux, uy = _transformed(params, g)
    n_runs, n = params.shape[:2]
    sign = np.where(params[..., 3] > 0.5, -1.0, 1.0)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    c_sum, s_sum = cos_t.sum(0), sin_t.sum(0)
    resultant = np.hypot(c_sum, s_sum)
    dx, dy = ux - ux.mean(0), uy - uy.mean(0)
    value = float(np.mean(diameter ** 2 / 4.0 * (1.0 - resultant / n_runs)
                          + (dx * dx).mean(0) + (dy * dy).mean(0)))
    # d resultant / d theta_j = (S cos theta_j - C sin theta_j) / resultant; d theta_j / d g_j = sign
    d_res = (s_sum * cos_t - c_sum * sin_t) / np.where(resultant > 0, resultant, 1.0)
    # d ux_j / d g_j = sign (uy_j - y_j), d uy_j / d g_j = -sign (ux_j - sign x_j)  (g_j in radians)
    ux0 = ux - sign * g[:, 1:2]
    uy0 = uy - g[:, 2:3]
    d_angle = sign * (-diameter ** 2 / (4.0 * n_runs) * d_res + 2.0 / n_runs * (dx * uy0 - dy * ux0))
    grad = np.empty((n_runs, 3))
    grad[:, 0] = np.deg2rad(1.0) * d_angle.sum(1) / n
    grad[:, 1] = 2.0 / n_runs * (dx * sign).sum(1) / n
    grad[:, 2] = 2.0 / n_runs * dy.sum(1) / n
    return value, grad


def _initial_g(params: np.ndarray) -> np.ndarray:
    n_runs = params.shape[0]
    g = np.zeros((n_runs, 3))
    last = params[-1]
    for j in range(n_runs - 1):
        pj = params[j]
        sign = np.where(pj[:, 3] > 0.5, -1.0, 1.0)
        diff = np.deg2rad(sign * (last[:, 0] - pj[:, 0]))
        alpha = np.rad2deg(np.arctan2(np.sin(diff).mean(), np.cos(diff).mean()))
        g[j, 0] = alpha
        gz = g.copy()
        gz[j, 1:] = 0.0
        _, ux, uy = _transformed(params[j:j + 1], gz[j:j + 1])
        g[j, 1] = np.mean(sign * (last[:, 1] - ux[0]))
        g[j, 2] = np.mean(last[:, 2] - uy[0])
    return g


def multi_align_stability(ali: np.ndarray, thld_err: float, diameter: float) -> StabilityResult:
    """Stability of a group from ``L`` independent alignments of its members.

    Parameters
    ----------
    ali : ndarray, (L, n, 4)
        ``(alpha deg, sx, sy, mirror)`` of the n members in each of the L runs.
    thld_err : float
        Pixel-error threshold: members with error ``< thld_err`` are stable;
        members above ``3 * thld_err`` with the initial frames are removed before optimising.
    diameter : float
        Particle diameter in pixels (``2 * target_radius``).

    Returns
    -------
    StabilityResult
    """
    ali = np.asarray(ali, dtype=np.float64)
    n_runs, n = ali.shape[:2]
    if n == 0:
        return _empty(0, 0)
    ms, flips = mirror_consistent(ali[..., 3].astype(np.int64))
    ms_idx = np.flatnonzero(ms)
    if ms_idx.size == 0:
        return _empty(0, n)
    # make the mirror relation of every run to the last run trivial: toggling the flag = composing with
    # a pure mirror, a legitimate part of the run's frame transform.
    rel = flips ^ flips[-1]
    p = ali[:, ms_idx].copy()
    p[..., 3] = np.where(rel[:, None] == 1, 1 - p[..., 3], p[..., 3])
    g0 = _initial_g(p)
    e2 = pixel_errors_squared(p, g0, diameter)
    prever = float(np.sqrt(e2.mean()))
    keep = np.sqrt(e2) <= 3.0 * thld_err
    if keep.sum() <= 1:
        return _empty(ms_idx.size, n, prever)
    pk = p[:, keep]

    def objective(x):
        g = np.zeros((n_runs, 3))
        g[:-1] = x.reshape(n_runs - 1, 3)
        return pixel_errors_squared(pk, g, diameter).mean()

    def objective_and_gradient(x):
        g = np.zeros((n_runs, 3))
        g[:-1] = x.reshape(n_runs - 1, 3)
        value, grad = mean_error_and_gradient(pk, g, diameter)
        return value, grad[:-1].ravel()

    res = minimize(objective_and_gradient, g0[:-1].ravel(), jac=True, method="L-BFGS-B",
                   options={"maxcor": max(3, (n_runs - 1) * 3), "ftol": 10 * np.finfo(float).eps,
                            "gtol": 1e-9})
    g = np.zeros((n_runs, 3))
    g[:-1] = res.x.reshape(n_runs - 1, 3)
    if objective(res.x) > objective(g0[:-1].ravel()):
        g = g0
    e2k = pixel_errors_squared(pk, g, diameter)
    ek = np.sqrt(e2k)
    good = ek < thld_err
    theta, ux, uy = _transformed(pk[:, good], g)
    avg = np.empty((int(good.sum()), 4))
    avg[:, 0] = np.rad2deg(np.arctan2(np.sin(theta).sum(0), np.cos(theta).sum(0)))
    avg[:, 1] = ux.mean(0)
    avg[:, 2] = uy.mean(0)
    avg[:, 3] = pk[-1, good, 3]
    stable = ms_idx[np.flatnonzero(keep)[good]]
    order = np.argsort(stable)
    return StabilityResult(stable[order], ek[good][order], avg[order], ms_idx.size / n, prever)


# ---------------------------------------------------------------------------------------------
# within-group (reference-free) refinement and the per-class stability stage
# ---------------------------------------------------------------------------------------------


def correlations_with_others(aligned: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson correlation of each aligned image with the mean of the *other* images (leave-one-out).

    Parameters
    ----------
    aligned : ndarray, (n, T, T)
        Images already brought into the class frame, n >= 2.
    mask : ndarray of bool, (T, T)
        The pixels correlated (the particle disc).

    Returns
    -------
    ndarray of float64, (n,)
        Correlations in [-1, 1]; 0 for an image or a leave-one-out mean that is constant inside ``mask``.
    """
    n = len(aligned)
    x = np.asarray(aligned, dtype=np.float64)[:, mask]
    others = (x.sum(axis=0)[None] - x) / max(n - 1, 1)
    x = x - x.mean(axis=1, keepdims=True)
    others = others - others.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1) * np.linalg.norm(others, axis=1)
    dot = np.einsum("ij,ij->i", x, others)
    return np.divide(dot, norm, out=np.zeros(n), where=norm > 0)


def member_check(aligned: np.ndarray, mask: np.ndarray, fraction: float) -> np.ndarray:
    """The members of a stable class that look like the others (isavar extension, ``--member_check``).

    A member is kept when its correlation with the mean of the other members
    (:func:`correlations_with_others`) is at least ``fraction`` times the median of these correlations over
    the class. The median scales with the class's signal-to-noise ratio, so one fraction serves classes of any
    contrast; an image of pure noise that happened to align consistently in every stability run correlates
    with its class only by the alignment's selection bias, far below real members (``bench/isac2.md``).

    Parameters
    ----------
    aligned : ndarray, (n, T, T)
        The stable members in the class frame (their stability-averaged parameters).
    mask : ndarray of bool, (T, T)
        The particle disc.
    fraction : float
        0 keeps every member.

    Returns
    -------
    ndarray of bool, (n,)
        True for the members kept.
    """
    n = len(aligned)
    if fraction <= 0 or n < 3:
        return np.ones(n, dtype=bool)
    cc = correlations_with_others(aligned, mask)
    median = float(np.median(cc))
    if median <= 0:
        return np.ones(n, dtype=bool)        # no common signal to measure members against
    return cc >= fraction * median


def discrete_delta(it: int, total_iter: int, maxit_total: int, dst: float) -> float:
    """Angular step of pass ``it``: ``dst`` every 4th pass while ``total_iter <= maxit_total - 10``, else 0."""
    return float(dst) if (dst > 0 and it % 4 == 0 and total_iter <= maxit_total - 10) else 0.0


def last_discrete_pass(p) -> int:
    """Index of the last discrete-angle pass of a within-group run (-1 when there is none)."""
    its = [it for it in range(p.maxit - 1) if discrete_delta(it, it + 1, p.maxit, p.dst) != 0.0]
    return its[-1] if its else -1


def displacements(old: np.ndarray, new: np.ndarray, radius: float) -> np.ndarray:
    """Movement (pixels) of every image's points within ``radius`` of the centre between two parameter sets.

    For each image, ``2 sin(|d alpha| / 2) radius + |d t|`` bounds how far ``T_new(q)`` lies from
    ``T_old(q)`` for ``|q| <= radius`` (same mirror); a changed mirror counts as infinitely far.

    Parameters
    ----------
    old, new : ndarray, (n, 4)
        Rows ``[alpha, sx, sy, mirror]`` (degrees, pixels).
    radius : float
        Radius (pixels) of the disc whose points are compared.

    Returns
    -------
    ndarray, (n,)
    """
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    da = np.deg2rad(new[:, 0] - old[:, 0])
    d = 2.0 * np.abs(np.sin(da / 2.0)) * radius + np.hypot(new[:, 1] - old[:, 1], new[:, 2] - old[:, 2])
    return np.where(np.rint(old[:, 3]) != np.rint(new[:, 3]), np.inf, d)


def max_displacement(old: np.ndarray, new: np.ndarray, radius: float) -> float:
    """The largest of :func:`displacements` (0 for no image)."""
    d = displacements(old, new, radius)
    return float(d.max()) if d.size else 0.0


def settled(old: np.ndarray, new: np.ndarray, radius: float, tolerance: float, fraction: float = 0.0) -> bool:
    """Whether at most ``floor(fraction * n)`` of the ``n`` images moved further than ``tolerance`` pixels
    (:func:`displacements`); with ``fraction = 0``, whether :func:`max_displacement` is at most ``tolerance``."""
    d = displacements(old, new, radius)
    return int(np.count_nonzero(~(d <= tolerance))) <= int(np.floor(fraction * d.size + 1e-9))


def within_group_refinement(images, params, p, grid, rng, *, randomize: bool = True, cache=None,
                            want_average: bool = True):
    """Reference-free alignment of one group (spec §6.5).

    Parameters
    ----------
    images : ndarray, (n, T, T) float32
        The group's working images.
    params : ndarray, (n, 4)
        Current parameters (only the particle centres are kept when ``randomize``).
    p : Isac2Params
    grid : PolarGrid
        Rings ``ir..target_radius`` step ``rs``.
    rng : numpy.random.Generator
        Random start (rotation, mirror).
    randomize : bool
        Start from random rotations and mirrors.
    cache : SpectraCache, optional
        Ring spectra of ``images`` kept across passes (and runs); a new one is used when None.
    want_average : bool
        Compute the final average (the last pass only averages); None is returned in its place otherwise.

    With ``p.within_stop > 0`` (isavar extension) the run ends early, once an alignment pass after the last
    discrete-angle pass, and not before pass ``(maxit - 1) // 2``, moves no image by more than ``within_stop``
    pixels but at most the fraction ``p.within_stop_fraction`` of them (:func:`settled`); the final average is
    then computed as the last pass would.

    Returns
    -------
    average : ndarray, (T, T) float32 or None
        The final tanh-filtered (FH, FF) average.
    params : ndarray, (n, 4)
        The parameters after the last alignment pass.
    """
    from isavar.isac import _ops

    n = len(images)
    params = np.asarray(params, dtype=np.float64).copy()
    if cache is None:
        cache = _ops.new_cache()
    if randomize:
        centre = _ops.particle_centre(params)
        rand = np.column_stack([rng.uniform(0.0, 360.0, n), np.zeros(n), np.zeros(n),
                                rng.integers(0, 2, n)]).astype(np.float64)
        params = _ops.compose(np.column_stack([np.zeros(n), -centre, np.zeros(n)]), rand)
    stop_tol = float(p.within_stop)
    # the stop may end a run only after its last discrete-angle pass and once the filter ramp is half way
    # (with few passes an early low-resolution pass can move no image and yet be far from the alignment)
    first_stop = max(last_discrete_pass(p) + 1, (p.maxit - 1) // 2) if stop_tol > 0 else 0
    for it in range(p.maxit - 1):
        # the intermediate references only enter the search through their rings, so they are built from
        # the images' ring spectra; the returned average is a real-space one (deviation note in docs)
        fl = 0.1 + (p.FH - 0.1) * it / (p.maxit - 1)
        avg = _ops.tanh_lowpass(_ops.polar_mean(images, params, grid, cache), fl, p.FF)
        delta = discrete_delta(it, it + 1, p.maxit, p.dst)
        new = _ops.align_single(images, avg, grid, p, params, delta, cache=cache,
                                coarse_rows=p.within_shift_candidates)
        converged = (stop_tol > 0 and it >= first_stop
                     and settled(params, new, p.target_radius, stop_tol, p.within_stop_fraction))
        params = new
        if converged:
            break                     # isavar extension (--within_stop): the remaining passes would not move
    if not want_average:
        return None, params
    # the last pass only averages (SPHIRE's filter of pass maxit - 1, i.e. FH up to rounding)
    avg = _ops.transform_sum(images, params) / np.float32(n)
    return _ops.tanh_lowpass(avg, 0.1 + (p.FH - 0.1) * (p.maxit - 1) / (p.maxit - 1), p.FF), params


def class_stability_task(task):
    """Within-group stage of one class (spec §6.4): run 1, optionally L - 1 more runs, the test and
    (``p.member_check > 0``, isavar) the member check (:func:`member_check`) of its stable members.

    Parameters
    ----------
    task : tuple
        ``(images (n, T, T), params (n, 4), p, grid, rng, check_stability)``.

    Returns
    -------
    dict
        ``average`` (T, T), ``params`` (n, 4) new parameters (stability-averaged for stable members),
        ``stable`` (positions of stable members or None when not checked), ``pixel_error``, ``mirror_rate``,
        ``checked_out`` (members that passed the stability test but not the member check).
    """
    from isavar.isac import _ops

    images, params, p, grid, rng, check = task
    images = np.asarray(images, dtype=np.float32).view()
    images.setflags(write=False)              # a read-only view: the cache need not fingerprint it every pass
    cache = _ops.new_cache()
    # with the stability check the class average is rebuilt from the stable members at the end
    avg, params = within_group_refinement(images, params, p, grid, rng, cache=cache, want_average=not check)
    if not check:
        return {"average": avg, "params": params, "stable": None, "pixel_error": np.nan, "mirror_rate": np.nan,
                "checked_out": 0}
    runs = [params]
    for _ in range(p.stab_ali - 1):
        _, params = within_group_refinement(images, params, p, grid, rng, cache=cache, want_average=False)
        runs.append(params)
    res = multi_align_stability(np.stack(runs), p.thld_err, 2.0 * p.target_radius)
    n_passed = res.stable.size
    if p.member_check > 0 and res.stable.size:
        mask = _ops.circle(images.shape[-1], p.target_radius) > 0.5
        keep = member_check(_ops.transform(images[res.stable], res.params), mask, p.member_check)
        res = replace(res, stable=res.stable[keep], errors=res.errors[keep], params=res.params[keep])
    params = params.copy()
    if res.stable.size:
        params[res.stable] = res.params
        sel = res.stable
    else:
        sel = np.arange(len(images))          # no stable member: the reference is the plain average
    avg = _ops.transform_sum(images[sel], params[sel]) / np.float32(len(sel))
    avg = _ops.tanh_lowpass(avg, p.FH, p.FF)
    return {"average": avg, "params": params, "stable": res.stable, "pixel_error": res.pixel_error,
            "mirror_rate": res.mirror_rate, "checked_out": n_passed - res.stable.size}
