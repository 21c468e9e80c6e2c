"""Density maps from atomic models (PDB / mmCIF) with gemmi."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from isavar.errors import InputError

log = logging.getLogger(__name__)

#: Real-space Gaussian width per Å of resolution (ChimeraX ``molmap``'s default sigmaFactor).
SIGMA_PER_RESOLUTION = 0.225

#: Default resolution in pixels when none is given (keeps the map band-limited at the grid).
DEFAULT_RESOLUTION_PX = 3.0


def resolution_bfactor_A2(resolution_A: float) -> float:
    """B-factor (Å²) of the Gaussian blur that simulates a map at ``resolution_A``.

    A real-space Gaussian of standard deviation ``sigma = 0.225 d`` (ChimeraX
    ``molmap``) has the Fourier envelope ``exp(-B s^2 / 4)`` with
    ``B = 8 pi^2 sigma^2 ~= 4.0 d^2``, i.e. ``exp(-1)`` at ``s = 1/d``.

    Parameters
    ----------
    resolution_A : float
        Target resolution ``d`` in Å.

    Returns
    -------
    float
        ``B`` in Å².
    """
    sigma = SIGMA_PER_RESOLUTION * float(resolution_A)
    return 8.0 * np.pi**2 * sigma**2


def read_model(path):
    """Read a PDB or mmCIF file with gemmi, without waters and hydrogens.

    Parameters
    ----------
    path : path-like
        ``.pdb``, ``.ent``, ``.cif``, ``.mmcif`` (optionally gzipped).

    Returns
    -------
    gemmi.Structure

    Raises
    ------
    InputError
        If the file is missing, unreadable or has no atoms.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError("atomic model file not found", path=path)
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read atomic model: {exc}", path=path) from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError("atomic model has no atoms", path=path)
    st.remove_waters()
    st.remove_hydrogens()
    st.remove_empty_chains()
    if st[0].count_atom_sites() == 0:
        raise InputError("atomic model has no atoms besides waters and hydrogens", path=path)
    return st


def volume_from_model(path, box: int, pixel_size_A: float, *, resolution_A: float | None = None) -> np.ndarray:
    """Simulate a cryo-EM density map from an atomic model.

    The first model of the file (waters and hydrogens removed) is moved so that
    its centre of mass sits on voxel ``box // 2``; the electrostatic potential
    is computed with gemmi's ``DensityCalculatorE`` (electron scattering
    factors) on a ``box``-voxel cubic P1 cell of edge ``box * pixel_size_A``,
    with every atomic B-factor replaced by the resolution blur of
    :func:`resolution_bfactor_A2` (so the map has exactly the requested
    resolution whatever the model's B-factors).

    Parameters
    ----------
    path : path-like
        PDB or mmCIF file.
    box : int
        Edge of the cubic map in voxels.
    pixel_size_A : float
        Voxel size in Å.
    resolution_A : float, optional
        Resolution of the map in Å; default ``3 * pixel_size_A`` (the blur
        envelope is then ``exp(-2.25)`` ~= 0.1 at Nyquist).

    Returns
    -------
    numpy.ndarray
        ``(box, box, box)`` float32 map, axes ``(z, y, x)`` (x last), in
        gemmi's units (potential per voxel volume).

    Raises
    ------
    InputError
        If the file cannot be read or the molecule (plus twice the blur width)
        does not fit inside the box.

    Examples
    --------
    >>> vol = volume_from_model("model.pdb", 64, 1.5, resolution_A=6.0)  # doctest: +SKIP
    """
    import gemmi

    if int(box) != box or box < 8:
        raise ValueError(f"box must be an integer >= 8, got {box!r}")
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be positive, got {pixel_size_A!r}")
    box = int(box)
    resolution = DEFAULT_RESOLUTION_PX * pixel_size_A if resolution_A is None else float(resolution_A)
    if not resolution > 0:
        raise ValueError(f"resolution_A must be positive, got {resolution_A!r}")
    st = read_model(path)
    model = st[0]
    com = model.calculate_center_of_mass()
    centre_A = (box // 2) * float(pixel_size_A)
    shift = gemmi.Position(centre_A - com.x, centre_A - com.y, centre_A - com.z)
    extent = 0.0
    for cra in model.all():
        cra.atom.pos = cra.atom.pos + shift
        cra.atom.b_iso = 0.0
        cra.atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
        extent = max(extent, cra.atom.pos.dist(gemmi.Position(centre_A, centre_A, centre_A)))
    half_box_A = (box // 2) * float(pixel_size_A)
    margin = 2.0 * SIGMA_PER_RESOLUTION * resolution
    if extent + margin > half_box_A:
        raise InputError(
            f"molecule radius {extent:.0f} Å (+{margin:.0f} Å blur) does not fit in a box of "
            f"{box} x {pixel_size_A:g} Å (radius {half_box_A:.0f} Å); use a larger --box or --apix", path=path)
    edge = box * float(pixel_size_A)
    st.cell = gemmi.UnitCell(edge, edge, edge, 90.0, 90.0, 90.0)
    st.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    calc.d_min = 2.0 * float(pixel_size_A)
    calc.blur = resolution_bfactor_A2(resolution)
    calc.grid.setup_from(st)
    calc.grid.set_size(box, box, box)
    calc.add_model_density_to_grid(model)
    # gemmi's grid is indexed [u, v, w] = [x, y, z]; isavar volumes are (z, y, x).
    volume = np.array(calc.grid, copy=True).transpose(2, 1, 0)
    log.debug("model %s: %d atoms, radius %.1f Å, blur B = %.1f Å^2", path, model.count_atom_sites(), extent,
              calc.blur)
    return np.ascontiguousarray(volume, dtype=np.float32)
