"""Equal-size k-means with alignment (spec isac2 §6.2-§6.3).

One EQK iteration aligns every image to every class reference (global rotation and
mirror, local translation), assigns images to classes under an equal-size
constraint (:func:`assign_groups`), and rebuilds the references as low-passed
averages of their members.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def assign_groups(scores: np.ndarray) -> np.ndarray:
    """Greedy equal-size assignment of images to classes (SPHIRE ``assign_groups``).

    All (class, image) pairs are visited in order of decreasing score; an image
    goes to the class of its first visited pair whose class is still open. A class
    closes at ``q = N // K`` members while more than one class is open; the last
    open class closes at ``q + N % K`` members.

    Parameters
    ----------
    scores : ndarray, (K, N)
        Score of image i against class k (larger is better).

    Returns
    -------
    ndarray of int, (N,)
        Class of each image (0-based). Ties are broken by the position of the pair
        in the flattened (class-major) score matrix.

    Raises
    ------
    ValueError
        If there are fewer images than classes.
    """
    scores = np.asarray(scores)
    n_classes, n_images = scores.shape
    if n_classes < 1 or n_images < n_classes:
        raise ValueError(f"cannot split {n_images} images into {n_classes} equal classes")
    q, r = divmod(n_images, n_classes)
    order = np.argsort(-scores.ravel(), kind="stable")
    cls_of_pair, img_of_pair = np.divmod(order, n_images)
    assignment = np.full(n_images, -1, dtype=np.int64)
    counts = np.zeros(n_classes, dtype=np.int64)
    _greedy(cls_of_pair, img_of_pair, q, r, assignment, counts, np.zeros(n_classes, np.bool_), n_classes)
    return assignment


@njit(cache=True)
def _greedy(cls_of_pair, img_of_pair, q, r, assignment, counts, closed, n_open):  # pragma: no cover - compiled
    """Visit (class, image) pairs in the given order, SPHIRE's rule; update ``assignment``, ``counts``, ``closed``.

    An image already assigned keeps its class; a class closes at ``q`` members while more than one class is
    open, the last open class at ``q + r``. Returns the number of classes still open.
    """
    n_left = 0
    for i in range(assignment.shape[0]):
        if assignment[i] < 0:
            n_left += 1
    if n_left == 0 or n_open == 0:
        return n_open
    for t in range(cls_of_pair.shape[0]):
        k = cls_of_pair[t]
        i = img_of_pair[t]
        if assignment[i] >= 0 or closed[k]:
            continue
        assignment[i] = k
        counts[k] += 1
        n_left -= 1
        limit = q if n_open > 1 else q + r
        if counts[k] >= limit:
            closed[k] = True
            n_open -= 1
            if n_open == 0 or n_left == 0:
                break
    return n_open


def assign_groups_sparse(pair_class, pair_image, pair_score, n_images: int, n_classes: int,
                         fallback) -> np.ndarray:
    """:func:`assign_groups` when only some (class, image) scores are known exactly (candidate search).

    The known pairs are visited in order of decreasing score under SPHIRE's equal-size rule; images whose
    known classes all closed first are then assigned the same way on the ``fallback`` scores of the classes
    still open. With every pair known this is :func:`assign_groups`.

    Parameters
    ----------
    pair_class, pair_image : (P,) int
        Class and image of every known pair.
    pair_score : (P,) float
        Their scores (larger is better); ties go to the earlier pair.
    n_images, n_classes : int
    fallback : callable
        ``fallback(images, classes) -> (len(images), len(classes))`` scores for the second phase.

    Returns
    -------
    ndarray of int, (N,)
    """
    if n_classes < 1 or n_images < n_classes:
        raise ValueError(f"cannot split {n_images} images into {n_classes} equal classes")
    q, r = divmod(n_images, n_classes)
    order = np.argsort(-np.asarray(pair_score), kind="stable")
    assignment = np.full(n_images, -1, dtype=np.int64)
    counts = np.zeros(n_classes, dtype=np.int64)
    closed = np.zeros(n_classes, np.bool_)
    n_open = _greedy(np.asarray(pair_class, np.int64)[order], np.asarray(pair_image, np.int64)[order], q, r,
                     assignment, counts, closed, n_classes)
    left = np.flatnonzero(assignment < 0)
    if left.size:
        open_ = np.flatnonzero(~closed)
        sc = np.asarray(fallback(left, open_), dtype=np.float64)              # (len(left), len(open_))
        order = np.argsort(-sc.ravel(), kind="stable")
        li, lk = np.divmod(order, open_.size)
        _greedy(open_[lk], left[li], q, r, assignment, counts, closed, n_open)
    return assignment


def class_sizes(assignment: np.ndarray, n_classes: int) -> np.ndarray:
    """Members per class."""
    return np.bincount(assignment, minlength=n_classes)


__all__ = ["assign_groups", "assign_groups_sparse", "class_sizes"]
