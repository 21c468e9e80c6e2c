"""Simulated particle stacks with ground truth (planted orientations, shifts, CTF, states, noise).

Image model, per particle ``i`` with state ``s_i``, rotation ``A_i`` (from
``true_angle_*``) and origin ``o_i`` (``true_origin_*`` / pixel size)::

    clean_i = IFFT( CTF_i * FFT( project(V[s_i], A_i, origins_px=o_i) ) )
    image_i = clean_i + sigma * white Gaussian noise

``project`` is :func:`isavar.core.projection.project` (ray sums; volume point
``X`` appears at ``(A X)[:2] - o`` relative to pixel ``N // 2``) and ``CTF_i``
is :func:`isavar.core.ctf.ctf_2d` (RELION convention) evaluated from the
particle's ``true_defocus_*`` and the table's ``voltage_kV``, ``cs_mm`` and
``amplitude_contrast``; the multiplication is done on the periodic box
(numpy FFT layout), so ``FFT(image) / FFT(projection)`` is exactly the CTF.
Pure-noise images (``true_is_noise == 1``) have ``clean_i = 0``.

Signal-to-noise ratio
---------------------
``SNR = mean_i var_M(clean_i) / sigma^2`` where ``var_M`` is the variance of
the noise-free, CTF-modulated image over the pixels of the centred disc ``M``
of radius ``mask_radius_px`` (about the image's own mean inside ``M``) and the
mean runs over particle images (pure-noise images excluded). ``sigma`` is set
from the first ``min(n_particles, 512)`` particle images of the table (all of
them for small stacks), so the realised SNR of a large stack matches the
request up to that sample's error (a few per cent). The default radius
``mask_radius_px`` encloses 99 % of the volumes' positive density
(:func:`particle_radius_px`).

Randomness
----------
One generator is split into independent child streams (orientations, shifts,
defocus, states, pure-noise selection, pixel noise); pixel noise of image
``i`` comes from ``SeedSequence(entropy, spawn_key=(i,))``, so a seed gives
identical images whatever the chunk size.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from isavar.conventions import euler_to_matrix, matrix_to_euler
from isavar.parallel.partition import chunk_ranges

log = logging.getLogger(__name__)

#: Microscope used by the simulator unless told otherwise (kV, mm, fraction).
DEFAULT_VOLTAGE_KV = 300.0
DEFAULT_CS_MM = 2.7
DEFAULT_AMPLITUDE_CONTRAST = 0.1

#: Number of particle images used to set the noise level from the requested SNR.
N_CALIBRATION = 512

_SYMMETRY = re.compile(r"^(c\d+|d\d+|tet|oct|icos)$")
_VIEWS = re.compile(r"^views:(\d+)$")


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def as_volume_list(volumes) -> list[np.ndarray]:
    """Normalise one volume or a sequence of volumes to a list of float32 cubes of one size.

    Parameters
    ----------
    volumes : numpy.ndarray or sequence of numpy.ndarray
        A ``(N, N, N)`` volume or several (one per conformational state).

    Returns
    -------
    list of numpy.ndarray
        float32 ``(N, N, N)`` arrays.
    """
    if isinstance(volumes, np.ndarray) and volumes.ndim == 3:
        volumes = [volumes]
    out = [np.ascontiguousarray(v, dtype=np.float32) for v in volumes]
    if not out:
        raise ValueError("at least one volume is needed")
    shape = out[0].shape
    for k, v in enumerate(out):
        if v.ndim != 3 or len(set(v.shape)) != 1:
            raise ValueError(f"volume {k} must be a cube (N, N, N), got shape {v.shape}")
        if v.shape != shape:
            raise ValueError(f"volume {k} has shape {v.shape}, volume 0 has {shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"volume {k} contains NaN or Inf")
    return out


def check_symmetry(symmetry: str) -> str:
    """Validate a point-group name (``c1``, ``c4``, ``d2``, ``tet``, ``oct``, ``icos``); return it lower-case."""
    sym = str(symmetry).strip().lower()
    if _SYMMETRY.match(sym) is None or sym in ("c0", "d0"):
        raise ValueError(f"unknown symmetry {symmetry!r} (expected c<n>, d<n>, tet, oct or icos)")
    return sym


def parse_orientations(spec: str) -> int | None:
    """Parse an orientation scheme: ``"random"`` -> None, ``"views:K"`` -> K (>= 1)."""
    text = str(spec).strip().lower()
    if text == "random":
        return None
    m = _VIEWS.match(text)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"orientations must be 'random' or 'views:K' with K >= 1, got {spec!r}")
    return int(m.group(1))


def normalise_weights(weights, n_states: int) -> np.ndarray:
    """Mixture weights as probabilities (default: equal).

    Parameters
    ----------
    weights : sequence of float or None
        Non-negative relative weights, one per state.
    n_states : int
        Number of states.

    Returns
    -------
    numpy.ndarray
        ``(n_states,)`` probabilities summing to 1.
    """
    if weights is None:
        return np.full(n_states, 1.0 / n_states)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n_states:
        raise ValueError(f"{w.size} weights given for {n_states} volumes")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


# --------------------------------------------------------------------------------------
# Orientations
# --------------------------------------------------------------------------------------


def uniform_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Rotation matrices distributed uniformly (Haar measure) on SO(3).

    Normalised 4D standard-normal vectors are uniform unit quaternions, whose
    matrices are Haar-distributed (Shoemake 1992).

    Parameters
    ----------
    n : int
        Number of rotations.
    rng : numpy.random.Generator
        Random stream.

    Returns
    -------
    numpy.ndarray
        ``(n, 3, 3)`` float64 proper rotation matrices.
    """
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def sample_orientations(n: int, orientations: str, rng: np.random.Generator):
    """Draw Euler angles for ``n`` particles.

    Parameters
    ----------
    n : int
        Number of particles.
    orientations : str
        ``"random"``: uniform on SO(3). ``"views:K"``: K viewing directions
        drawn uniformly on the sphere; the particles are spread over them as
        evenly as possible (``n // K`` or ``n // K + 1`` each, in random
        order) and each gets a uniform random in-plane angle psi.
    rng : numpy.random.Generator
        Random stream.

    Returns
    -------
    rot, tilt, psi : numpy.ndarray
        ``(n,)`` RELION ZYZ angles in degrees.
    view : numpy.ndarray
        ``(n,)`` int view index (``-1`` for ``"random"``).
    """
    k = parse_orientations(orientations)
    if k is None:
        rot, tilt, psi = matrix_to_euler(uniform_rotations(n, rng))
        return rot, tilt, psi, np.full(n, -1, dtype=np.int64)
    view_rot = rng.uniform(-180.0, 180.0, size=k)
    view_tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, size=k)))
    view = rng.permutation(np.arange(n) % k).astype(np.int64)
    psi = rng.uniform(-180.0, 180.0, size=n)
    return view_rot[view], view_tilt[view], psi, view


# --------------------------------------------------------------------------------------
# The particle table
# --------------------------------------------------------------------------------------


def draw_particle_table(n: int, *, box: int, pixel_size_A: float, n_states: int = 1, weights=None,
                        ctf: bool = True, defocus_range_A=(8000.0, 25000.0), astigmatism_A: float = 200.0,
                        shift_sd_A: float = 0.0, orientations: str = "random", noise_fraction: float = 0.0,
                        voltage_kV: float = DEFAULT_VOLTAGE_KV, cs_mm: float = DEFAULT_CS_MM,
                        amplitude_contrast: float = DEFAULT_AMPLITUDE_CONTRAST, rng=None) -> pd.DataFrame:
    """Draw the per-particle parameters of a simulation (no images).

    Parameters
    ----------
    n : int
        Number of images.
    box : int
        Image size in pixels.
    pixel_size_A : float
        Pixel size in Å.
    n_states : int
        Number of volumes (conformational states).
    weights : sequence of float, optional
        Relative frequency of each state (default equal); each particle's state
        is drawn independently.
    ctf : bool
        Draw CTF parameters. Without CTF the table has no CTF columns.
    defocus_range_A : (float, float)
        Mean defocus drawn uniformly in ``[min, max]`` Å (positive = underfocus).
    astigmatism_A : float
        ``|U - V|`` drawn uniformly in ``[0, astigmatism_A]`` Å around the mean
        (``U = mean + a/2``, ``V = mean - a/2``), angle uniform in [0, 180) degrees.
    shift_sd_A : float
        Standard deviation of each origin component in Å (Gaussian, mean 0).
    orientations : str
        ``"random"`` or ``"views:K"`` (see :func:`sample_orientations`).
    noise_fraction : float
        Fraction of images (rounded to a whole number) that hold only noise.
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope (written to every row when ``ctf``).
    rng : numpy.random.Generator or int or None
        Random stream or seed.

    Returns
    -------
    pandas.DataFrame
        Canonical columns (``image_index``, ``pixel_size_A``, ``image_size_px``,
        ``optics_group`` = 1, the CTF columns when ``ctf``, ``angle_*_deg``,
        ``origin_*_A``) set to the truth, and ground-truth copies
        ``true_angle_rot_deg``, ``true_angle_tilt_deg``, ``true_angle_psi_deg``,
        ``true_origin_x_A``, ``true_origin_y_A``, (``true_defocus_u_A``,
        ``true_defocus_v_A``, ``true_defocus_angle_deg`` when ``ctf``),
        ``true_conformation`` (0-based state, -1 for pure noise),
        ``true_view`` (``views:K`` only; -1 for pure noise) and
        ``true_is_noise`` (0/1). The images are not drawn here: the
        ``true_*`` columns are what :func:`clean_images` renders.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    if shift_sd_A < 0:
        raise ValueError(f"shift_sd_A must be >= 0, got {shift_sd_A}")
    probs = normalise_weights(weights, int(n_states))
    streams = np.random.default_rng(rng).spawn(5)
    rot, tilt, psi, view = sample_orientations(n, orientations, streams[0])
    origin = streams[1].normal(0.0, 1.0, size=(n, 2)) * float(shift_sd_A) + 0.0  # + 0.0: no negative zeros
    state = streams[3].choice(len(probs), size=n, p=probs).astype(np.int64)
    is_noise = np.zeros(n, dtype=np.int64)
    n_noise = int(round(noise_fraction * n))
    if n_noise:
        is_noise[streams[4].choice(n, size=n_noise, replace=False)] = 1
    state[is_noise == 1] = -1
    view[is_noise == 1] = -1

    table = pd.DataFrame({
        "image_index": np.arange(n, dtype=np.int64),
        "pixel_size_A": float(pixel_size_A),
        "image_size_px": int(box),
        "optics_group": 1,
    })
    if ctf:
        table = pd.concat([table, _draw_ctf(n, defocus_range_A, astigmatism_A, streams[2], voltage_kV, cs_mm,
                                            amplitude_contrast)], axis=1)
    table["angle_rot_deg"], table["angle_tilt_deg"], table["angle_psi_deg"] = rot, tilt, psi
    table["origin_x_A"], table["origin_y_A"] = origin[:, 0], origin[:, 1]
    for name in ("angle_rot_deg", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "origin_y_A"):
        table["true_" + name] = table[name].to_numpy(copy=True)
    if ctf:
        for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg"):
            table["true_" + name] = table[name].to_numpy(copy=True)
    table["true_conformation"] = state
    if parse_orientations(orientations) is not None:
        table["true_view"] = view
    table["true_is_noise"] = is_noise
    return table


def _draw_ctf(n, defocus_range_A, astigmatism_A, rng, voltage_kV, cs_mm, amplitude_contrast) -> pd.DataFrame:
    lo, hi = (float(v) for v in defocus_range_A)
    if not 0 < lo <= hi:
        raise ValueError(f"defocus range must satisfy 0 < min <= max (Å), got {defocus_range_A}")
    if astigmatism_A < 0 or astigmatism_A >= 2 * lo:
        raise ValueError(f"astigmatism_A must be in [0, 2 * min defocus), got {astigmatism_A}")
    mean = rng.uniform(lo, hi, size=n)
    astig = rng.uniform(0.0, float(astigmatism_A), size=n)
    angle = rng.uniform(0.0, 180.0, size=n)
    return pd.DataFrame({
        "defocus_u_A": mean + astig / 2.0,
        "defocus_v_A": mean - astig / 2.0,
        "defocus_angle_deg": angle,
        "voltage_kV": float(voltage_kV),
        "cs_mm": float(cs_mm),
        "amplitude_contrast": float(amplitude_contrast),
        "phase_shift_deg": 0.0,
        "ctf_bfactor_A2": 0.0,
    })


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def particle_radius_px(volume: np.ndarray, fraction: float = 0.99) -> float:
    """Radius around the box centre that holds ``fraction`` of a volume's positive density.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(N, N, N)`` volume.
    fraction : float
        Fraction of ``sum(max(volume, 0))`` to enclose.

    Returns
    -------
    float
        Radius in voxels (distance of the last voxel needed, from voxel ``N // 2``).
    """
    n = volume.shape[0]
    coords = np.arange(n) - n // 2
    r2 = coords[:, None, None] ** 2 + coords[None, :, None] ** 2 + coords[None, None, :] ** 2
    weights = np.maximum(np.asarray(volume, dtype=np.float64), 0.0).ravel()
    if weights.sum() <= 0:
        raise ValueError("volume has no positive density")
    order = np.argsort(r2.ravel(), kind="stable")
    cumulative = np.cumsum(weights[order])
    last = int(np.searchsorted(cumulative, fraction * cumulative[-1]))
    return float(np.sqrt(r2.ravel()[order[min(last, order.size - 1)]]))


def disc_mask(box: int, radius_px: float) -> np.ndarray:
    """Boolean ``(box, box)`` disc of radius ``radius_px`` around pixel ``box // 2`` (edge included)."""
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius_px**2


def masked_variance(images: np.ndarray, radius_px: float) -> np.ndarray:
    """Per-image variance over the centred disc of radius ``radius_px``.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, N, N)`` images.
    radius_px : float
        Disc radius in pixels.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 variances (about each image's mean inside the disc, ddof 0).
    """
    mask = disc_mask(images.shape[-1], radius_px)
    return np.asarray(images, dtype=np.float64)[:, mask].var(axis=1)


def apply_ctf(images: np.ndarray, table: pd.DataFrame, pixel_size_A: float) -> np.ndarray:
    """Multiply images by their CTF in Fourier space (periodic box, numpy FFT layout).

    Parameters
    ----------
    images : numpy.ndarray
        ``(k, N, N)`` float32 images.
    table : pandas.DataFrame
        ``k`` rows with ``true_defocus_u_A``, ``true_defocus_v_A``,
        ``true_defocus_angle_deg``, ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``.
    pixel_size_A : float
        Pixel size in Å.

    Returns
    -------
    numpy.ndarray
        ``(k, N, N)`` float32 ``IFFT(CTF * FFT(images))``.
    """
    from isavar.core.ctf import ctf_2d

    k, ny, nx = images.shape
    ctf = ctf_2d((ny, nx), float(pixel_size_A),
                 defocus_u_A=table["true_defocus_u_A"].to_numpy(np.float64),
                 defocus_v_A=table["true_defocus_v_A"].to_numpy(np.float64),
                 defocus_angle_deg=table["true_defocus_angle_deg"].to_numpy(np.float64),
                 voltage_kV=table["voltage_kV"].to_numpy(np.float64),
                 cs_mm=table["cs_mm"].to_numpy(np.float64),
                 amplitude_contrast=table["amplitude_contrast"].to_numpy(np.float64),
                 rfft=True)
    spectrum = np.fft.rfft2(images) * ctf
    return np.fft.irfft2(spectrum, s=(ny, nx)).astype(np.float32)


def clean_images(volumes, table: pd.DataFrame, rows=None, *, projectors=None) -> np.ndarray:
    """Noise-free images of table rows, rendered from their ``true_*`` columns.

    Parameters
    ----------
    volumes : numpy.ndarray or sequence of numpy.ndarray
        The ``(N, N, N)`` state volumes indexed by ``true_conformation``.
    table : pandas.DataFrame
        Simulation table (see :func:`draw_particle_table`).
    rows : array_like of int, optional
        Positional rows to render (default all).
    projectors : sequence, optional
        One :class:`isavar.core.projection.Projector` per volume, to reuse the
        prepared 3D transforms across calls (built here when absent).

    Returns
    -------
    numpy.ndarray
        ``(k, N, N)`` float32: projections at the true orientation and origin,
        multiplied by the CTF when the table has ``true_defocus_u_A``; zero for
        pure-noise rows.
    """
    from isavar.core.projection import Projector

    vols = as_volume_list(volumes)
    sub = table if rows is None else table.iloc[np.asarray(rows, dtype=np.int64)]
    box = vols[0].shape[0]
    apix = float(sub["pixel_size_A"].iloc[0]) if len(sub) else 1.0
    out = np.zeros((len(sub), box, box), dtype=np.float32)
    states = sub["true_conformation"].to_numpy(np.int64)
    if np.any(states >= len(vols)):
        raise ValueError(f"table refers to state {states.max()} but {len(vols)} volume(s) were given")
    rotations = euler_to_matrix(sub["true_angle_rot_deg"].to_numpy(), sub["true_angle_tilt_deg"].to_numpy(),
                                sub["true_angle_psi_deg"].to_numpy())
    origins_px = np.stack([sub["true_origin_x_A"].to_numpy(np.float64),
                           sub["true_origin_y_A"].to_numpy(np.float64)], axis=1) / apix
    for s in np.unique(states[states >= 0]):
        sel = np.flatnonzero(states == s)
        projector = projectors[s] if projectors is not None else Projector(vols[s])
        out[sel] = projector.project(rotations[sel], origins_px=origins_px[sel])
    if "true_defocus_u_A" in sub.columns and len(sub):
        out = apply_ctf(out, sub, apix)
        out[states < 0] = 0.0
    return out


def noise_images(indices, box: int, sigma: float, entropy: int) -> np.ndarray:
    """White Gaussian noise images, image ``i`` drawn from ``SeedSequence(entropy, spawn_key=(i,))``.

    Parameters
    ----------
    indices : array_like of int
        Image indices (0-based positions in the stack).
    box : int
        Image size.
    sigma : float
        Standard deviation per pixel.
    entropy : int
        Seed entropy of the simulation.

    Returns
    -------
    numpy.ndarray
        ``(k, box, box)`` float32.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((indices.size, box, box), dtype=np.float32)
    for j, i in enumerate(indices):
        gen = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(int(i),)))
        out[j] = gen.standard_normal((box, box), dtype=np.float32)
    out *= np.float32(sigma)
    return out


def noise_sigma_for_snr(volumes, table: pd.DataFrame, snr: float | None, *, mask_radius_px: float,
                        n_calibration: int = N_CALIBRATION, projectors=None) -> tuple[float, float]:
    """Noise standard deviation giving the requested SNR (definition in the module docstring).

    Parameters
    ----------
    volumes : sequence of numpy.ndarray
        State volumes.
    table : pandas.DataFrame
        Simulation table.
    snr : float or None
        Requested ``var(signal) / var(noise)``; None or ``inf`` means no noise.
    mask_radius_px : float
        Radius of the disc over which the signal variance is measured.
    n_calibration : int
        Number of particle images (the first ones of the table) used.
    projectors : sequence, optional
        Prepared projectors, as in :func:`clean_images`.

    Returns
    -------
    sigma : float
        Noise standard deviation per pixel (0 for no noise).
    signal_variance : float
        Mean masked variance of the noise-free signal over the calibration images.
    """
    signal_rows = np.flatnonzero(table["true_is_noise"].to_numpy() == 0)[: int(n_calibration)]
    if signal_rows.size == 0:
        signal_variance = float("nan")
    else:
        signal_variance = float(masked_variance(clean_images(volumes, table, signal_rows, projectors=projectors),
                                                mask_radius_px).mean())
    if snr is None or math.isinf(snr):
        return 0.0, signal_variance
    if not snr > 0:
        raise ValueError(f"snr must be positive (or inf for no noise), got {snr}")
    if not signal_variance > 0:
        raise ValueError("cannot set the noise from an SNR: the simulated signal has zero variance "
                         "(empty volume, or only pure-noise images)")
    return math.sqrt(signal_variance / snr), signal_variance


@dataclass(frozen=True)
class SimulationPlan:
    """Everything that determines a simulated stack; images are rendered on demand, chunk by chunk.

    Attributes
    ----------
    volumes : tuple of numpy.ndarray
        State volumes ``(N, N, N)``, float32.
    table : pandas.DataFrame
        Particle table with canonical and ``true_*`` columns.
    pixel_size_A : float
        Pixel size in Å.
    snr : float or None
        Requested SNR (None: noise-free).
    noise_sigma : float
        Noise standard deviation per pixel.
    signal_variance : float
        Mean masked signal variance used to set ``noise_sigma``.
    mask_radius_px : float
        Radius of the disc used in the SNR definition.
    noise_entropy : int
        Seed entropy of the pixel noise.
    symmetry : str
        Point group of the volumes as declared by the caller (recorded, not imposed).
    orientations : str
        Orientation scheme.
    """

    volumes: tuple
    table: pd.DataFrame
    pixel_size_A: float
    snr: float | None
    noise_sigma: float
    signal_variance: float
    mask_radius_px: float
    noise_entropy: int
    symmetry: str = "c1"
    orientations: str = "random"
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of images."""
        return len(self.table)

    @property
    def box(self) -> int:
        """Image size in pixels."""
        return int(self.volumes[0].shape[0])

    def projectors(self) -> list:
        """One prepared :class:`isavar.core.projection.Projector` per volume (built once, then reused)."""
        if "_projectors" not in self.__dict__:
            from isavar.core.projection import Projector

            object.__setattr__(self, "_projectors", [Projector(v) for v in self.volumes])
        return self.__dict__["_projectors"]

    def render(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` (float32 ``(stop - start, N, N)``), noise included."""
        rows = np.arange(start, stop)
        images = clean_images(self.volumes, self.table, rows, projectors=self.projectors())
        if self.noise_sigma > 0:
            images += noise_images(rows, self.box, self.noise_sigma, self.noise_entropy)
        return images

    def chunks(self, chunk_size: int = 512, *, progress=None):
        """Yield ``(start, stop, images)`` over the whole stack, ``chunk_size`` images at a time.

        Parameters
        ----------
        chunk_size : int
            Images per chunk (bounds memory; does not change the images).
        progress : Progress, optional
            Advanced by the number of images of each chunk.
        """
        for start, stop in chunk_ranges(self.n, int(chunk_size)):
            images = self.render(start, stop)
            if progress is not None:
                progress.advance(stop - start)
            yield start, stop, images

    def image_chunks(self, chunk_size: int = 512, *, progress=None):
        """Like :meth:`chunks` but yields only the image arrays (for ``io.write_particles``)."""
        for _, _, images in self.chunks(chunk_size, progress=progress):
            yield images

    def images(self, chunk_size: int = 512) -> np.ndarray:
        """The whole stack as one ``(n, N, N)`` float32 array."""
        out = np.empty((self.n, self.box, self.box), dtype=np.float32)
        for start, stop, images in self.chunks(chunk_size):
            out[start:stop] = images
        return out

    def summary(self) -> dict:
        """JSON-friendly description (for provenance)."""
        counts = self.table["true_conformation"].value_counts().sort_index()
        return {
            "n_images": self.n,
            "box": self.box,
            "pixel_size_A": self.pixel_size_A,
            "snr_requested": self.snr,
            "noise_sigma": self.noise_sigma,
            "signal_variance": self.signal_variance,
            "snr_mask_radius_px": self.mask_radius_px,
            "symmetry": self.symmetry,
            "orientations": self.orientations,
            "ctf": "true_defocus_u_A" in self.table.columns,
            "n_pure_noise": int(self.table["true_is_noise"].sum()),
            "state_counts": {str(int(k)): int(v) for k, v in counts.items()},
            **self.extra,
        }


def plan_simulation(volumes, n: int, *, pixel_size_A: float, snr: float | None = 0.1,
                    defocus_range_A=(8000.0, 25000.0), ctf: bool = True, shift_sd_A: float = 0.0,
                    orientations: str = "random", weights=None, symmetry: str = "c1",
                    astigmatism_A: float = 200.0, noise_fraction: float = 0.0,
                    voltage_kV: float = DEFAULT_VOLTAGE_KV, cs_mm: float = DEFAULT_CS_MM,
                    amplitude_contrast: float = DEFAULT_AMPLITUDE_CONTRAST, mask_radius_px: float | None = None,
                    rng=None) -> SimulationPlan:
    """Draw the table and the noise level of a simulation; render images later with the plan.

    Parameters are those of :func:`simulate_particles`.

    Returns
    -------
    SimulationPlan
    """
    vols = tuple(as_volume_list(volumes))
    sym = check_symmetry(symmetry)
    if noise_fraction > 0 and (snr is None or math.isinf(snr)):
        raise ValueError("pure-noise images (noise_fraction > 0) need noise: give a finite snr")
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be positive, got {pixel_size_A}")
    box = vols[0].shape[0]
    gen = np.random.default_rng(rng)
    table_rng, noise_rng = gen.spawn(2)
    table = draw_particle_table(n, box=box, pixel_size_A=pixel_size_A, n_states=len(vols), weights=weights,
                                ctf=ctf, defocus_range_A=defocus_range_A, astigmatism_A=astigmatism_A,
                                shift_sd_A=shift_sd_A, orientations=orientations, noise_fraction=noise_fraction,
                                voltage_kV=voltage_kV, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                                rng=table_rng)
    if mask_radius_px is None:
        nonempty = [v for v in vols if np.any(v > 0)]
        radius = max(particle_radius_px(v) for v in nonempty) if nonempty else box // 2 - 1
        mask_radius_px = float(min(max(radius, 2.0), box // 2 - 1))
    entropy = int(noise_rng.integers(0, 2**63 - 1))
    from isavar.core.projection import Projector

    projectors = [Projector(v) for v in vols]
    sigma, signal_variance = noise_sigma_for_snr(vols, table, snr, mask_radius_px=mask_radius_px,
                                                 projectors=projectors)
    log.debug("simulation: %d images, box %d, sigma %.4g (signal variance %.4g in r=%.1f px)", n, box, sigma,
              signal_variance, mask_radius_px)
    plan = SimulationPlan(vols, table, float(pixel_size_A), None if snr is None or math.isinf(snr) else float(snr),
                          sigma, signal_variance, float(mask_radius_px), entropy, sym, str(orientations))
    object.__setattr__(plan, "_projectors", projectors)
    return plan


def simulate_particles(volumes, n: int, *, pixel_size_A: float, snr: float | None = 0.1,
                       defocus_range_A=(8000.0, 25000.0), ctf: bool = True, shift_sd_A: float = 0.0,
                       orientations: str = "random", weights=None, symmetry: str = "c1",
                       astigmatism_A: float = 200.0, noise_fraction: float = 0.0,
                       voltage_kV: float = DEFAULT_VOLTAGE_KV, cs_mm: float = DEFAULT_CS_MM,
                       amplitude_contrast: float = DEFAULT_AMPLITUDE_CONTRAST, mask_radius_px: float | None = None,
                       chunk_size: int = 512, rng=None):
    """Simulate a particle stack with ground truth.

    Parameters
    ----------
    volumes : numpy.ndarray or sequence of numpy.ndarray
        One ``(N, N, N)`` volume, or one per conformational state.
    n : int
        Number of images.
    pixel_size_A : float
        Pixel size in Å.
    snr : float or None
        Signal-to-noise ratio as defined in the module docstring; None or
        ``inf`` gives noise-free images.
    defocus_range_A : (float, float)
        Mean defocus range in Å (uniform); ignored without CTF.
    ctf : bool
        Multiply by the CTF (300 kV, Cs 2.7 mm, amplitude contrast 0.1 unless
        ``voltage_kV``/``cs_mm``/``amplitude_contrast`` say otherwise).
    shift_sd_A : float
        Standard deviation of the origin components in Å.
    orientations : str
        ``"random"`` (uniform on SO(3)) or ``"views:K"``.
    weights : sequence of float, optional
        Relative frequency of each volume (default equal).
    symmetry : str
        Point group of the volumes (validated and recorded; orientations are
        drawn over all of SO(3) in any case).
    astigmatism_A : float
        Largest ``|U - V|`` in Å.
    noise_fraction : float
        Fraction of pure-noise images (``true_is_noise == 1``).
    voltage_kV, cs_mm, amplitude_contrast : float
        Microscope parameters.
    mask_radius_px : float, optional
        Radius of the disc of the SNR definition (default: radius holding 99 %
        of the volumes' positive density).
    chunk_size : int
        Images rendered at a time.
    rng : numpy.random.Generator or int or None
        Random stream or seed.

    Returns
    -------
    images : numpy.ndarray
        ``(n, N, N)`` float32.
    table : pandas.DataFrame
        Canonical and ``true_*`` columns (see :func:`draw_particle_table`).

    Examples
    --------
    >>> from isavar.synthetic import phantom_volume
    >>> vol = phantom_volume("blob", 32, 3.0)
    >>> images, table = simulate_particles(vol, 10, pixel_size_A=3.0, snr=0.5, rng=0)  # doctest: +SKIP
    >>> images.shape, table["true_conformation"].unique().tolist()  # doctest: +SKIP
    ((10, 32, 32), [0])
    """
    plan = plan_simulation(volumes, n, pixel_size_A=pixel_size_A, snr=snr, defocus_range_A=defocus_range_A, ctf=ctf,
                           shift_sd_A=shift_sd_A, orientations=orientations, weights=weights, symmetry=symmetry,
                           astigmatism_A=astigmatism_A, noise_fraction=noise_fraction, voltage_kV=voltage_kV,
                           cs_mm=cs_mm, amplitude_contrast=amplitude_contrast, mask_radius_px=mask_radius_px,
                           rng=rng)
    return plan.images(chunk_size), plan.table.copy()
