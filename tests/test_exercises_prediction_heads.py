"""The prediction-heads chapter's exercise checks: each passes two different correct answers and fails
typical mistakes (pooling over padding, position −1 under right padding, the length as index under left
padding; two outputs, a sigmoid, a (B, 1) output, no bias; bits, no projection, a supervised projection,
a Gaussian formula for a class label).

The correct answers are written independently of minipeft (plain tensors, scikit-learn, numpy).
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import digamma
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.feature_selection import mutual_info_classif
from torch import nn

from minipeft.exercises import check_mi_estimate, check_pooling, check_regression_head


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


# -- exercise 1: pooling ---------------------------------------------------------------------------------
def pool_weights(h, mask, how):
    m = mask.float()
    t = torch.arange(m.shape[1], dtype=torch.float32)
    if how == "mean":
        w = m / m.sum(1, keepdim=True)
    elif how == "last":
        w = torch.nn.functional.one_hot((m * t).argmax(1), m.shape[1]).float()
    else:
        w = torch.nn.functional.one_hot((m * (m.shape[1] - t)).argmax(1), m.shape[1]).float()
    return torch.einsum("bt,btd->bd", w, h)


def pool_gather(h, mask, how):  # a second correct answer: index positions row by row
    rows = []
    for b in range(h.shape[0]):
        idx = mask[b].nonzero().flatten()
        rows.append(h[b, idx].mean(0) if how == "mean" else h[b, idx[-1] if how == "last" else idx[0]])
    return torch.stack(rows)


def pool_mean_over_padding(h, mask, how):
    return h.mean(1) if how == "mean" else pool_weights(h, mask, how)


def pool_position_minus_one(h, mask, how):
    return h[:, -1] if how == "last" else pool_weights(h, mask, how)


def pool_length_minus_one(h, mask, how):  # right for right padding only
    return h[torch.arange(len(h)), mask.sum(1) - 1] if how == "last" else pool_weights(h, mask, how)


def pool_position_zero(h, mask, how):
    return h[:, 0] if how == "first" else pool_weights(h, mask, how)


@pytest.mark.parametrize("fn", [pool_weights, pool_gather])
def test_pooling_correct_passes(fn):
    assert check_pooling(fn)


@pytest.mark.parametrize("fn, fails", [
    (pool_mean_over_padding, [2]),
    (pool_position_minus_one, [0]),
    (pool_length_minus_one, [1]),
    (pool_position_zero, [3]),
])
def test_pooling_broken_fails(fn, fails):
    report = check_pooling(fn)
    assert not report and failing(report) == fails


# -- exercise 2: a regression head ------------------------------------------------------------------------
class LinearHead(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 1)

    def forward(self, z):
        return self.proj(z).squeeze(-1)


class VectorHead(nn.Module):  # a second correct answer: w and b as parameters
    def __init__(self, d):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return z @ self.w + self.b


class TwoOutputs(LinearHead):  # a 2-class classifier's head
    def __init__(self, d):
        super().__init__(d)
        self.proj = nn.Linear(d, 2)


class Sigmoid(LinearHead):
    def forward(self, z):
        return torch.sigmoid(super().forward(z))


class KeepDim(LinearHead):
    def forward(self, z):
        return self.proj(z)  # (B, 1)


class NoBias(LinearHead):
    def __init__(self, d):
        super().__init__(d)
        self.proj = nn.Linear(d, 1, bias=False)


@pytest.mark.parametrize("cls", [LinearHead, VectorHead])
def test_regression_head_correct_passes(cls):
    assert check_regression_head(cls)


@pytest.mark.parametrize("cls, fails", [(TwoOutputs, [0, 2]), (Sigmoid, [1, 2]), (KeepDim, [0]), (NoBias, [2])])
def test_regression_head_broken_fails(cls, fails):
    report = check_regression_head(cls)
    assert not report and failing(report) == fails


# -- exercise 3: an MI estimate ---------------------------------------------------------------------------
def mi_sklearn_pca(x, y):
    z = x if x.shape[1] == 1 else PCA(1, random_state=0).fit_transform(x)
    return mutual_info_classif(z, y, random_state=0)[0]


def mi_own_ross(x, y, k=3):  # a second correct answer: SVD to 3 dims, Ross's estimator by brute force
    x = x - x.mean(0)
    if x.shape[1] > 3:
        x = x @ np.linalg.svd(x, full_matrices=False)[2][:3].T
    x = x / x.std(0)
    dist = np.abs(x[:, None, :] - x[None, :, :]).max(-1)
    np.fill_diagonal(dist, np.inf)
    radius, n_class = np.empty(len(y)), np.empty(len(y))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        radius[idx] = np.sort(dist[np.ix_(idx, idx)], 1)[:, k - 1]
        n_class[idx] = len(idx)
    m = (dist < radius[:, None]).sum(1) + 1
    return max(0.0, digamma(len(y)) + digamma(k) - digamma(n_class).mean() - digamma(m).mean())


def mi_bits(x, y):
    return mi_sklearn_pca(x, y) / math.log(2)


def mi_no_projection(x, y):
    from minipeft.mi import mutual_information
    return mutual_information(x, y, n_components=None)


def mi_lda(x, y):
    return mutual_info_classif(LinearDiscriminantAnalysis(n_components=1).fit_transform(x, y), y, random_state=0)[0]


def mi_gaussian_formula(x, y):
    z = x[:, 0] if x.shape[1] == 1 else PCA(1, random_state=0).fit_transform(x)[:, 0]
    r = np.corrcoef(z, y)[0, 1]
    return -0.5 * math.log(1 - r * r)


@pytest.mark.parametrize("fn", [mi_sklearn_pca, mi_own_ross])
def test_mi_estimate_correct_passes(fn):
    assert check_mi_estimate(fn)


@pytest.mark.parametrize("fn, fails", [
    (mi_bits, [0, 1, 3]),
    (mi_no_projection, [3]),
    (mi_lda, [2]),
    (mi_gaussian_formula, [1]),
])
def test_mi_estimate_broken_fails(fn, fails):
    report = check_mi_estimate(fn)
    assert not report and failing(report) == fails
