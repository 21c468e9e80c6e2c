"""isavar: fast, validated ISAC2 2D classification and 3D variability for cryo-EM.

Public API (see :mod:`isavar.api`)::

    import isavar
    stack = isavar.read_particles("particles.star")
    classes = isavar.isac2(stack, radius=60, img_per_grp=100, CTF=True)
    var = isavar.variability("run_data.star", img_per_grp=100, ctf=True)

The package has no side effects at import: no logging configuration, no MPI,
no directories, and the functions above import their modules on first use.
Command-line use goes through :func:`isavar.cli.main`.

``isavar.variability`` is also the subpackage of the 3D variability algorithm
(``from isavar.variability import VariabilityParams``); calling it runs
:func:`isavar.api.variability`.
"""

import sys
import types

from isavar._version import __version__

__all__ = ["__version__", "isac2", "read_particles", "variability"]

_API = ("isac2", "read_particles")


class _VariabilityPackage(types.ModuleType):
    """The ``isavar.variability`` subpackage, callable as :func:`isavar.api.variability`."""

    def __call__(self, *args, **kwargs):
        from isavar.api import variability

        return variability(*args, **kwargs)


class _Package(types.ModuleType):
    """This package's module type: the ``variability`` subpackage is made callable when it is bound here."""

    def __setattr__(self, name, value):
        if name == "variability" and type(value) is types.ModuleType:
            value.__class__ = _VariabilityPackage
        super().__setattr__(name, value)


def __getattr__(name):
    if name in _API:
        from isavar import api

        return getattr(api, name)
    if name == "variability":
        import importlib

        return importlib.import_module("isavar.variability")
    raise AttributeError(f"module 'isavar' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package
