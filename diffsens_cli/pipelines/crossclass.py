"""Cross-class influence (paper Fig. 11): entry (i, j) is the mean influence score of the
class-j training images on the model samples of class i.  Model samples get their class
from a classifier fitted on the labelled training images (scikit-learn's multinomial
logistic regression on pixels), whose accuracy on held-out training images is reported.
"""

from __future__ import annotations

import numpy as np


def classify(train_images: np.ndarray, train_labels: np.ndarray, samples: np.ndarray, held_out: float,
             seed: int) -> tuple[np.ndarray, float]:
    """The classes of ``samples`` [M, *event], and the accuracy of the classifier on the
    share ``held_out`` of the training images (a seeded draw) kept out of its fit."""
    from sklearn.linear_model import LogisticRegression

    x, y = train_images.reshape(len(train_images), -1), np.asarray(train_labels)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - held_out)))
    fit, held = order[:cut], order[cut:]
    clf = LogisticRegression(max_iter=2000).fit(x[fit], y[fit])
    accuracy = float((clf.predict(x[held]) == y[held]).mean()) if len(held) else float("nan")
    return clf.predict(samples.reshape(len(samples), -1)), accuracy


def crossclass_matrix(scores: np.ndarray, sample_classes: np.ndarray, train_labels: np.ndarray,
                      classes: np.ndarray) -> np.ndarray:
    """[C, C]: the mean over model samples of class i of the mean score of the class-j
    training images; NaN where no model sample (or no training image) has the class."""
    out = np.full((len(classes), len(classes)), np.nan)
    for j, cj in enumerate(classes):
        in_j = train_labels == cj
        if not in_j.any():
            continue
        per_sample = scores[:, in_j].mean(1)  # [M]
        for i, ci in enumerate(classes):
            if (sample_classes == ci).any():
                out[i, j] = per_sample[sample_classes == ci].mean()
    return out


def diagonal_dominance(matrix: np.ndarray) -> float:
    """Mean of the diagonal over mean of the off-diagonal entries (finite entries only):
    1 when a sample's own class is no more influential than the others, large when it is."""
    finite = np.isfinite(matrix)
    diag = np.eye(len(matrix), dtype=bool)
    return float(matrix[finite & diag].mean() / matrix[finite & ~diag].mean())
