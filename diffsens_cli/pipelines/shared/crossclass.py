"""Cross-class influence (paper Fig. 11): entry (i, j) is the mean influence score of the
class-j training images on the model samples of class i.  Model samples get their class
from a classifier fitted on the labelled training images, whose accuracy on held-out
training images is reported: scikit-learn's multinomial logistic regression on pixels
(``logistic``; enough for the 8x8 digits) or a small convolutional network trained with
torch (``cnn``; for natural images such as CIFAR-10, where pixels alone give ~40%).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

CLASSIFIERS = {"logistic": "scikit-learn LogisticRegression on pixels",
               "cnn": "a 3-block CNN (two conv-BN-ReLU and a max-pool each, global pooling) trained with AdamW"}


def classify(train_images: np.ndarray, train_labels: np.ndarray, samples: np.ndarray, held_out: float,
             seed: int, classifier: str = "logistic", epochs: int = 30, flip: bool = False,
             device: torch.device | str = "cpu") -> tuple[np.ndarray, float]:
    """The classes of ``samples`` [M, *event], and the accuracy of the classifier on the
    share ``held_out`` of the training images (a seeded draw) kept out of its fit
    (``epochs`` and ``flip``, random horizontal flips, apply to the CNN)."""
    y = np.asarray(train_labels)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(len(y) * (1 - held_out)))
    fit, held = order[:cut], order[cut:]
    if classifier == "cnn":
        net, classes = fit_cnn(train_images[fit], y[fit], epochs, flip, seed, torch.device(device))
        predict = lambda x: classes[_apply(net, x).argmax(1).numpy()]
    else:
        predict = _fit_logistic(train_images[fit], y[fit])
    accuracy = float((predict(train_images[held]) == y[held]).mean()) if len(held) else float("nan")
    return predict(samples), accuracy


def _fit_logistic(images: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression on the pixels; returns its predict function."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1), labels)
    return lambda x: clf.predict(x.reshape(len(x), -1))


def build_cnn(channels: int, num_classes: int, seed: int) -> nn.Sequential:
    """The classifier ``fit_cnn`` trains, with seeded initial weights (the global RNG
    untouched): three blocks of two conv-BN-ReLU and a max-pool, global pooling, then a
    linear head; everything before the head (``net[:-1]``) gives its penultimate features."""
    width, blocks = 64, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            channels = out
        return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def fit_cnn(images: np.ndarray, labels: np.ndarray, epochs: int, flip: bool, seed: int,
            device: torch.device | str = "cpu") -> tuple[nn.Sequential, np.ndarray]:
    """``build_cnn`` fitted to images [N, C, H, W] in [-1, 1] (in eval mode, on ``device``),
    and the classes its outputs stand for."""
    device = torch.device(device)
    classes, targets = np.unique(labels, return_inverse=True)
    gen = torch.Generator().manual_seed(seed)
    net = build_cnn(images.shape[1], len(classes), seed).to(device)
    x = torch.as_tensor(images, dtype=torch.float32)
    t = torch.as_tensor(targets, dtype=torch.long)
    batch = 256
    steps = epochs * -(-len(x) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb, tb = x[idx].to(device), t[idx].to(device)
            if flip:
                mirrored = (torch.rand(len(idx), generator=gen) < 0.5).to(device)[:, None, None, None]
                xb = torch.where(mirrored, xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(net(xb), tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval(), classes


@torch.no_grad()
def _apply(net: nn.Module, images: np.ndarray) -> torch.Tensor:
    """``net`` on numpy images [N, C, H, W] in batches of 1024; the outputs on the CPU."""
    device = next(net.parameters()).device
    xs = torch.as_tensor(images, dtype=torch.float32).split(1024)
    return torch.cat([net(xb.to(device)).cpu() for xb in xs])


def features(net: nn.Sequential, images: np.ndarray) -> np.ndarray:
    """The penultimate features [N, width] of a ``build_cnn`` network."""
    return _apply(net[:-1], images).numpy()


def crossclass_matrix(scores: np.ndarray, sample_classes: np.ndarray, train_labels: np.ndarray,
                      classes: np.ndarray) -> np.ndarray:
    """[C, C]: the mean over model samples of class i of the mean score of the class-j
    training images; NaN where no model sample (or no training image) has the class."""
    train_onehot = (np.asarray(train_labels)[:, None] == classes).astype(float)  # [N, C]
    sample_onehot = (np.asarray(sample_classes)[:, None] == classes).astype(float)  # [M, C]
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: a class with no members
        per_sample = scores @ train_onehot / train_onehot.sum(0)  # [M, C]: class means per sample
        return sample_onehot.T @ per_sample / sample_onehot.sum(0)[:, None]


def diagonal_dominance(matrix: np.ndarray) -> float:
    """Mean of the diagonal over mean of the off-diagonal entries (finite entries only):
    1 when a sample's own class is no more influential than the others, large when it is."""
    finite = np.isfinite(matrix)
    diag = np.eye(len(matrix), dtype=bool)
    return float(matrix[finite & diag].mean() / matrix[finite & ~diag].mean())
