"""The prediction-heads chapter's exercise checks: each passes several different correct answers and fails
typical mistakes on the right line (pooling over padding, position −1 under right padding, the length as index
under left padding; two outputs, a sigmoid, a (B, 1) output, no bias; bits, no projection, a supervised
projection, a Gaussian formula for a class label, per-feature MIs summed). A solution that raises gives FAIL
lines, never a traceback.

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


def pool_flip_float64(h, mask, how):  # a third: float64 throughout, "last" by argmax on the flipped mask
    m, h = mask.double(), h.double()
    if how == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    idx = m.shape[1] - 1 - m.flip(1).argmax(1) if how == "last" else m.argmax(1)  # argmax: the first maximum
    return h[torch.arange(len(h)), idx]


def pool_mean_over_padding(h, mask, how):
    return h.mean(1) if how == "mean" else pool_weights(h, mask, how)


def pool_position_minus_one(h, mask, how):
    return h[:, -1] if how == "last" else pool_weights(h, mask, how)


def pool_length_minus_one(h, mask, how):  # right for right padding only
    return h[torch.arange(len(h)), mask.sum(1) - 1] if how == "last" else pool_weights(h, mask, how)


def pool_position_zero(h, mask, how):
    return h[:, 0] if how == "first" else pool_weights(h, mask, how)


def pool_mean_divided_by_length(h, mask, how):  # padding zeroed in the sum, but the count is T
    return (h * mask[..., None]).sum(1) / h.shape[1] if how == "mean" else pool_weights(h, mask, how)


def pool_flat_mask(h, mask, how):  # h[mask] flattens the batch: one mean over every real token of every row
    return h[mask.bool()].mean(0) if how == "mean" else pool_weights(h, mask, how)


@pytest.mark.parametrize("fn", [pool_weights, pool_gather, pool_flip_float64])
def test_pooling_correct_passes(fn):
    assert check_pooling(fn)


@pytest.mark.parametrize("fn, fails", [
    (pool_mean_over_padding, [2]),
    (pool_position_minus_one, [0]),
    (pool_length_minus_one, [1]),
    (pool_position_zero, [3]),
    (pool_mean_divided_by_length, [2]),
    (pool_flat_mask, [2]),
])
def test_pooling_broken_fails(fn, fails):
    report = check_pooling(fn)
    assert not report and failing(report) == fails


def test_pooling_shape_and_raising(capsys):
    check_pooling(pool_flat_mask)
    assert "mean: shape (5,), expected (batch, d) = (4, 5)" in capsys.readouterr().out

    def raises(h, mask, how):  # a misspelt key: a KeyError on the "first" line
        return {"last": pool_weights, "mean": pool_weights, "frist": pool_weights}[how](h, mask, how)
    report = check_pooling(raises)
    assert not report and failing(report) == [3]
    report = check_pooling(lambda h, mask, how: h.gather(1, mask))  # the wrong index shape: raises inside
    assert not report and failing(report) == [0, 1, 2, 3]


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


class DropoutHead(nn.Module):  # a third: dropout before the projection, flattened with view
    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(0.1), nn.Linear(d, 1))

    def forward(self, z):
        return self.net(z).view(-1)


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


class ReluOut(LinearHead):  # a ReLU on the output: no negative predictions
    def forward(self, z):
        return torch.relu(super().forward(z))


@pytest.mark.parametrize("cls", [LinearHead, VectorHead, DropoutHead])
def test_regression_head_correct_passes(cls):
    assert check_regression_head(cls)


@pytest.mark.parametrize("cls, fails", [(TwoOutputs, [0, 2]), (Sigmoid, [1, 2]), (KeepDim, [0]), (NoBias, [2]),
                                        (ReluOut, [1, 2])])
def test_regression_head_broken_fails(cls, fails):
    report = check_regression_head(cls)
    assert not report and failing(report) == fails


def test_regression_head_shape_and_raising(capsys):
    check_regression_head(TwoOutputs)
    out = capsys.readouterr().out
    assert "output shape (64, 2); expected (64,)" in out and "128 numbers for 64 examples" in out

    class WrongWidth(LinearHead):  # built for d + 1 inputs: the learner's matmul fails
        def __init__(self, d):
            super().__init__(d + 1)
    report = check_regression_head(WrongWidth)
    assert not report and failing(report) == [0, 1, 2]


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


def mi_quantile_bins(x, y, bins=8):
    """A third: the plug-in MI of the first principal component cut into 8 equally filled bins, and the label."""
    z = x[:, 0] if x.shape[1] == 1 else PCA(1, random_state=0).fit_transform(x)[:, 0]
    b = np.searchsorted(np.quantile(z, np.linspace(0, 1, bins + 1)[1:-1]), z)
    joint = np.zeros((bins, 2))
    np.add.at(joint, (b, y), 1)
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    return torch.tensor((p[p > 0] * np.log(p[p > 0] / outer[p > 0])).sum())  # a 0-d tensor is one number too


def mi_sklearn_array(x, y):  # sklearn's answer as it comes: an array holding one number
    return mutual_info_classif(x if x.shape[1] == 1 else PCA(1, random_state=0).fit_transform(x), y, random_state=0)


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


_per_column = {}


def per_column_mi(x, y):
    """sklearn's one MI per column, computed once per data set (256 columns take most of a second)."""
    key = (x.shape, float(x[0, 0]), float(x[-1, -1]))
    if key not in _per_column:
        _per_column[key] = mutual_info_classif(x, y, random_state=0)
    return _per_column[key].copy()


def mi_sum_per_feature(x, y):  # one MI per column, summed: each column's small positive bias adds up
    return per_column_mi(x, y).sum()


def mi_best_feature(x, y):  # the best single column: the label's direction is not a column
    return per_column_mi(x, y).max()


def mi_per_feature(x, y):  # one number per column returned as it is
    return per_column_mi(x, y)


@pytest.mark.parametrize("fn", [mi_sklearn_pca, mi_own_ross, mi_quantile_bins, mi_sklearn_array])
def test_mi_estimate_correct_passes(fn):
    assert check_mi_estimate(fn)


@pytest.mark.parametrize("fn, fails", [
    (mi_bits, [0, 1, 3]),
    (mi_no_projection, [3]),
    (mi_lda, [2]),
    (mi_gaussian_formula, [1]),
    (mi_sum_per_feature, [2, 3]),
    (mi_best_feature, [3]),
    (mi_per_feature, [2, 3]),
])
def test_mi_estimate_broken_fails(fn, fails):
    report = check_mi_estimate(fn)
    assert not report and failing(report) == fails


def test_mi_estimate_shape_and_raising(capsys):
    check_mi_estimate(mi_per_feature)
    assert "returned 256 numbers (shape (256,)); expected one" in capsys.readouterr().out
    report = check_mi_estimate(lambda x, y: mutual_info_classif(x[:, 0], y)[0])  # 1-D features: sklearn raises
    assert not report and failing(report) == [0, 1, 2, 3]


def test_unstarted_stubs_are_invitations():
    class Stub(nn.Module):
        def __init__(self, hidden_size):
            raise NotImplementedError("your code here")

    def stub(*args):
        raise NotImplementedError("your code here")

    for report in (check_pooling(stub), check_regression_head(Stub), check_mi_estimate(stub)):
        assert not report and not report.attempted
