"""Equal-size k-means with alignment (spec isac2 §6.2-§6.3).

One EQK iteration aligns every image to every class reference (global rotation and
mirror, local translation), assigns images to classes under an equal-size
constraint (:func:`assign_groups`), and rebuilds the references as low-passed
averages of their members.
"""

from __future__ import annotations

import numpy as np


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
    open_ = np.ones(n_classes, dtype=bool)
    n_open = n_classes
    n_left = n_images
    for k, i in zip(cls_of_pair.tolist(), img_of_pair.tolist()):
        if assignment[i] >= 0 or not open_[k]:
            continue
        assignment[i] = k
        counts[k] += 1
        n_left -= 1
        limit = q if n_open > 1 else q + r
        if counts[k] >= limit:
            open_[k] = False
            n_open -= 1
            if n_open == 0 or n_left == 0:
                break
    return assignment


def class_sizes(assignment: np.ndarray, n_classes: int) -> np.ndarray:
    """Members per class."""
    return np.bincount(assignment, minlength=n_classes)


__all__ = ["assign_groups", "class_sizes"]
