"""Synthetic data with ground truth: phantoms, maps from atomic models, simulated particle stacks.

Public API
----------
* :func:`phantom_volume` -- deterministic Gaussian-blob phantoms (``"blob"``,
  ``"two_state"``, symmetric ``"c4"`` ...).
* :func:`volume_from_model` -- density map from a PDB/mmCIF model (gemmi).
* :func:`simulate_particles` -- images and a particle table with ``true_*``
  columns; :func:`plan_simulation` gives the same simulation as a
  :class:`SimulationPlan` that renders chunk by chunk (large stacks).
"""

from isavar.synthetic.models import volume_from_model
from isavar.synthetic.phantoms import gaussian_blobs_volume, phantom_names, phantom_volume
from isavar.synthetic.simulate import (
    SimulationPlan,
    clean_images,
    draw_particle_table,
    plan_simulation,
    simulate_particles,
    uniform_rotations,
)

__all__ = [
    "SimulationPlan",
    "clean_images",
    "draw_particle_table",
    "gaussian_blobs_volume",
    "phantom_names",
    "phantom_volume",
    "plan_simulation",
    "simulate_particles",
    "uniform_rotations",
    "volume_from_model",
]
