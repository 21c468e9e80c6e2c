"""The public Python API: ``isavar.read_particles``, ``isavar.isac2``, ``isavar.variability``.

Each function takes particles as a file name (``.star``, ``.mrcs``, ``.hdf``, ``.cs``) or as what
:func:`read_particles` returned, and returns the result in memory. Given an ``outdir``, ISAC2 and
3D variability instead run as the command line does: every output file, a log and provenance in
that directory, and an interrupted run continues when called again with the same arguments.

Options are the fields of :class:`isavar.isac.params.Isac2Params` and
:class:`isavar.variability.params.VariabilityParams` (the command-line options, with their names
there), given as keywords.

Examples
--------
>>> import isavar                                                            # doctest: +SKIP
>>> stack = isavar.read_particles("Extract/job007/particles.star")           # doctest: +SKIP
>>> res = isavar.isac2(stack, radius=60, img_per_grp=100, CTF=True)          # doctest: +SKIP
>>> res.averages.shape, len(res.members)                                     # doctest: +SKIP
>>> var = isavar.variability("Refine3D/job010/run_data.star", img_per_grp=100, ctf=True)  # doctest: +SKIP
>>> var.var3d.shape                                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from isavar.io import ParticleStack
from isavar.io import read_particles as _read_particles

__all__ = ["isac2", "read_particles", "variability"]


def read_particles(path, *, pixel_size_A: float | None = None, project_dir=None) -> ParticleStack:
    """Read a particle file: its table, its images (read lazily) and its pixel size.

    Parameters
    ----------
    path : path-like
        ``.star`` (RELION 3.0 / 3.1+), ``.mrcs``/``.mrc``, ``.hdf`` (EMAN2/SPHIRE) or ``.cs`` (cryoSPARC).
    pixel_size_A : float, optional
        Pixel size (Å) replacing the file's.
    project_dir : path-like, optional
        RELION project directory against which relative image names are resolved first.

    Returns
    -------
    ParticleStack
        ``.table`` (pandas.DataFrame, one row per particle), ``.images`` ((N, box, box) float32,
        indexable like an array, read on demand), ``.pixel_size_A``; ``close()`` releases the files
        (also a context manager).

    Raises
    ------
    InputError
        Missing or unreadable file, unknown format, inconsistent stacks (one line naming the file).
    """
    return _read_particles(path, pixel_size_A=pixel_size_A, project_dir=project_dir)


@contextlib.contextmanager
def _executor(workers: int):
    from isavar.parallel import make_executor

    ex = make_executor("pool" if int(workers) > 1 else "serial", int(workers))
    try:
        yield ex
    finally:
        ex.close()


@contextlib.contextmanager
def _as_stack(particles, pixel_size_A, project_dir):
    """A ParticleStack given, or read from a path (and closed on exit)."""
    if isinstance(particles, ParticleStack):
        if pixel_size_A is not None:
            raise TypeError("pixel_size_A applies to a file name; pass it to read_particles instead")
        yield particles
        return
    stack = _read_particles(particles, pixel_size_A=pixel_size_A, project_dir=project_dir)
    try:
        yield stack
    finally:
        stack.close()


def _file_only(particles, outdir, what):
    if isinstance(particles, (ParticleStack, np.ndarray)):
        raise TypeError(f"{what} with outdir reads the particles from a file: pass the file name, not "
                        f"{type(particles).__name__}")
    return Path(particles)



def _parameters(cls, params, options: dict):
    """``params`` as given, or ``cls(**options)``; a TypeError when both are given."""
    if params is not None and options:
        raise TypeError("give either params or keyword options, not both")
    return params if params is not None else cls(**options)


def isac2(particles, outdir=None, *, params=None, workers: int = 1, pixel_size_A: float | None = None,
          project_dir=None, **options):
    """ISAC2 2D classification (SPHIRE ``sp_isac2.py``).

    Parameters
    ----------
    particles : path-like, ParticleStack or ndarray (N, box, box)
        Particle file, what :func:`read_particles` returned, or the images alone (no CTF then).
    outdir : path-like, optional
        Write the output directory as ``isavar isac2`` does (``particles`` must be a file name);
        calling again with the same arguments continues an interrupted run. Without it nothing
        is written.
    params : Isac2Params, optional
        All parameters at once (instead of ``options``).
    workers : int
        Local processes (results do not depend on it).
    pixel_size_A : float, optional
        Pixel size (Å) replacing the file's.
    project_dir : path-like, optional
        RELION project directory (relative image names; STAR outputs relative to it).
    **options
        :class:`~isavar.isac.params.Isac2Params` fields, e.g. ``radius`` (required, input pixels),
        ``img_per_grp``, ``CTF``, ``rand_seed``.

    Returns
    -------
    Isac2Result
        ``.averages`` (C, T, T) working-scale class averages, ``.members`` (list of index arrays
        into the input), ``.params`` (N, 4) alignment, ``.pixel_errors``, ``.history``.

    Raises
    ------
    InputError
        Unreadable input, too few images, an ``outdir`` holding another run.
    TypeError
        Both ``params`` and ``options``, or an ``outdir`` with particles given in memory.

    Notes
    -----
    Without ``rand_seed`` a run in memory draws its seed from the system (not recorded); with
    ``outdir`` the seed drawn is recorded and reused when the run continues.
    """
    from isavar.isac.params import Isac2Params

    p = _parameters(Isac2Params, params, options)
    with _executor(workers) as ex:
        if outdir is not None:
            from isavar.workflows.isac2 import run_isac2

            return run_isac2(_file_only(particles, outdir, "isac2"), outdir, p, executor=ex,
                             pixel_size_A=pixel_size_A, project_dir=project_dir)
        from isavar.isac.run import isac2 as isac2_in_memory

        p = p.validate()
        if isinstance(particles, np.ndarray):
            return isac2_in_memory(particles, p, executor=ex, pixel_size_A=pixel_size_A)
        with _as_stack(particles, pixel_size_A, project_dir) as stack:
            return isac2_in_memory(np.asarray(stack.images[np.arange(len(stack))]), p, executor=ex,
                                   table=stack.table, pixel_size_A=stack.pixel_size_A)


def variability(particles, outdir=None, *, params=None, workers: int = 1, pixel_size_A: float | None = None,
                project_dir=None, **options):
    """3D variability (SPHIRE ``sx3dvariability.py``): the variance map of oriented particles.

    Parameters
    ----------
    particles : path-like or ParticleStack
        Particles with 3D orientations (and CTF parameters with ``ctf=True``).
    outdir : path-like, optional
        Write the output directory as ``isavar 3dvariability`` does (``particles`` must be a file
        name); calling again with the same arguments continues an interrupted run. Without it
        nothing is written (the 2D maps are not kept).
    params : VariabilityParams, optional
        All parameters at once (instead of ``options``).
    workers : int
        Local processes (results do not depend on it).
    pixel_size_A : float, optional
        Pixel size (Å) replacing the file's.
    project_dir : path-like, optional
        RELION project directory.
    **options
        :class:`~isavar.variability.params.VariabilityParams` fields, e.g. ``img_per_grp``, ``ctf``,
        ``symmetry``.

    Returns
    -------
    VariabilityResult
        ``.var3d`` (and ``.ave3d``) volumes at the input pixel size, with timings and counts.

    Raises
    ------
    InputError
        Unreadable input, missing orientations or CTF parameters, an ``outdir`` holding another run.
    TypeError
        Both ``params`` and ``options``, or an ``outdir`` with particles given in memory.
    """
    from isavar.variability.params import VariabilityParams

    p = _parameters(VariabilityParams, params, options)
    with _executor(workers) as ex:
        if outdir is not None:
            from isavar.workflows.variability import run_variability

            return run_variability(_file_only(particles, outdir, "variability"), outdir, p, executor=ex,
                                   pixel_size_A=pixel_size_A, project_dir=project_dir)
        from isavar.variability.run import variability as variability_in_memory

        from isavar.workflows.variability import stack_pixel_size

        with _as_stack(particles, pixel_size_A, project_dir) as stack:
            return variability_in_memory(stack.table, stack.images, p, executor=ex,
                                         pixel_size_A=stack_pixel_size(stack, _name(particles)),
                                         source=_name(particles))


def _name(particles) -> str:
    return (particles.path or "<particles>") if isinstance(particles, ParticleStack) else str(particles)
