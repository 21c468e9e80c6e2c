"""Library calls of the workflows leave the ``isavar`` logger as they found it; the run's log.txt is written."""

from __future__ import annotations

import logging

import pytest

from isavar.io import write_particles
from isavar.isac.params import Isac2Params
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.variability.params import VariabilityParams
from isavar.workflows.isac2 import run_isac2
from isavar.workflows.variability import run_variability

from _hooks import StopForTest, stop_after


@pytest.fixture
def isavar_logger():
    """The ``isavar`` logger set to WARNING with one handler of the caller's; restored afterwards."""
    logger = logging.getLogger("isavar")
    saved = logger.level, list(logger.handlers)
    mine = logging.NullHandler()
    for h in saved[1]:
        logger.removeHandler(h)
    logger.addHandler(mine)
    logger.setLevel(logging.WARNING)
    yield logger, mine
    logger.removeHandler(mine)
    for h in saved[1]:
        logger.addHandler(h)
    logger.setLevel(saved[0])


def _particles(tmp_path, n, box, apix, **kw):
    vol = phantom_volume("blob", box, apix)
    imgs, table = simulate_particles(vol, n, pixel_size_A=apix, rng=3, **kw)
    path = tmp_path / "in" / "particles.star"
    path.parent.mkdir()
    write_particles(path, imgs, table, pixel_size_A=apix)
    return path


def test_variability_restores_the_logger_and_writes_its_log(tmp_path, isavar_logger):
    logger, mine = isavar_logger
    star = _particles(tmp_path, 60, 24, 3.0, snr=2.0)
    before = list(logger.handlers)          # ours, plus the capture handlers some pytest versions attach
    run_variability(star, tmp_path / "out", VariabilityParams(img_per_grp=10, save_ave2d=False,
                                                              save_var2d=False))
    assert logger.level == logging.WARNING and logger.handlers == before and mine in before
    text = (tmp_path / "out" / "log.txt").read_text()
    assert "isavar 3dvariability" in text and "parameters:" in text        # INFO messages reach the file


def test_interrupted_isac2_restores_the_logger(tmp_path, isavar_logger):
    logger, mine = isavar_logger
    star = _particles(tmp_path, 100, 40, 3.0, snr=0.5, orientations="views:3")
    p = Isac2Params(radius=15, target_radius=10, target_nx=28, img_per_grp=40, minimum_grp_size=15, maxit=4,
                    init_iter=1, stab_ali=2, rand_seed=5)
    before = list(logger.handlers)
    with pytest.raises(StopForTest):
        run_isac2(star, tmp_path / "out", p, on_checkpoint=stop_after(1))
    assert logger.level == logging.WARNING and logger.handlers == before and mine in before
    assert "building the working stack" in (tmp_path / "out" / "log.txt").read_text()


def test_3dva_restores_the_logger_and_writes_its_log(tmp_path, isavar_logger):
    from isavar.covariance import CovarianceParams
    from isavar.workflows.covariance import run_3dva

    logger, mine = isavar_logger
    star = _particles(tmp_path, 60, 24, 3.0, snr=2.0)
    before = list(logger.handlers)
    run_3dva(star, tmp_path / "out", CovarianceParams(n_components=1, iterations=2))
    assert logger.level == logging.WARNING and logger.handlers == before and mine in before
    text = (tmp_path / "out" / "log.txt").read_text()
    assert "isavar 3dva" in text and "parameters:" in text
