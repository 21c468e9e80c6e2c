"""Small synthetic 2D data with planted classes for the ISAC tests (helpers, imported by the tests)."""

import numpy as np

from isavar.isac import _ops
from isavar.isac.params import Isac2Params


def prototypes(n=48):
    y, x = np.mgrid[:n, :n] - n // 2

    def blob(cx, cy, s):
        return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * s * s))

    return np.array([
        blob(-5, 0, 3) + blob(5, 4, 2.5) + 0.7 * blob(0, -7, 2),
        blob(0, 0, 6) + blob(7, 7, 2),
        blob(-6, -6, 2.5) + blob(6, -6, 2.5) + blob(0, 7, 2.5),
        blob(0, 0, 2.5) + blob(-8, 2, 2) + 0.5 * blob(4, -5, 4),
    ], dtype=np.float32)


def planted_stack(n_per=50, n_noise=30, snr=0.3, seed=0, box=48):
    """Rotated/mirrored/shifted noisy copies of 4 prototypes plus pure-noise images.

    Returns images (n, box, box), truth (class, -1 for noise), params applied (n, 4).
    """
    rng = np.random.default_rng(seed)
    protos = prototypes(box)
    imgs, truth, pars = [], [], []
    for k, pr in enumerate(protos):
        par = np.column_stack([rng.uniform(-180, 180, n_per), rng.normal(0, 1.0, n_per),
                               rng.normal(0, 1.0, n_per), rng.integers(0, 2, n_per)])
        imgs.append(_ops.transform(np.repeat(pr[None], n_per, 0), par))
        truth += [k] * n_per
        pars.append(par)
    imgs = np.concatenate(imgs)
    sig = imgs.std()
    imgs = imgs + rng.normal(0, sig / np.sqrt(snr), imgs.shape).astype(np.float32)
    noise = rng.normal(0, imgs.std(), (n_noise, box, box)).astype(np.float32)
    return (np.concatenate([imgs, noise]), np.array(truth + [-1] * n_noise),
            np.concatenate(pars + [np.zeros((n_noise, 4))]))


def small_params(**kw):
    base = dict(radius=16, target_radius=10, target_nx=28, img_per_grp=50, minimum_grp_size=20, maxit=10,
                init_iter=3, stab_ali=3, rand_seed=1, thld_err=1.0)
    base.update(kw)
    return Isac2Params(**base)




def count_coarse_pairs(monkeypatch):
    """Make ``_ops.coarse_scores`` record the (image, reference) pairs it scores.

    Returns the list the pair counts are appended to (one entry per call) and the unpatched function.
    """
    from isavar.isac import _ops as ops

    pairs = []
    real = ops.coarse_scores

    def counting(images, prep, *args, **kw):
        pairs.append(len(images) * prep.n_refs)
        return real(images, prep, *args, **kw)

    monkeypatch.setattr(ops, "coarse_scores", counting)
    return pairs, real
