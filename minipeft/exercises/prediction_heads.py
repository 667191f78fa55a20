"""Checks for the prediction-heads chapter's exercises.

    from minipeft.exercises import check_pooling, check_regression_head, check_mi_estimate
    check_pooling(my_pool)                  # my_pool(hidden (B, T, d), attention_mask (B, T), how) -> (B, d)
    check_regression_head(MyRegressionHead) # MyRegressionHead(hidden_size)(z (B, d)) -> (B,) one number each
    check_mi_estimate(my_mi)                # my_mi(features (N, D) array, labels (N,) int array) -> nats

`how` is "last" (the last real token), "mean" (over real tokens) or "first" (the first real token, [CLS]);
attention_mask has 1 on real tokens and 0 on padding, which may be on the right or on the left. The
references inside the checks are loops over positions, least squares, and the true MI of a two-class
Gaussian mixture by quadrature (`minipeft.mi.binary_gaussian_mi`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._runner import run_checks


def _masks():
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]])
    return right, right.flip(1)  # the same lengths, padded on the right / on the left


def _loop_pool(h, mask, how):
    out = []
    for b in range(h.shape[0]):
        real = [t for t in range(h.shape[1]) if mask[b, t] == 1]
        out.append(sum(h[b, t] for t in real) / len(real) if how == "mean" else h[b, real[-1 if how == "last" else 0]])
    return torch.stack(out)


def check_pooling(fn):
    """Check `fn(hidden, attention_mask, how) -> (B, d)` for how in "last", "mean", "first", padded either side."""
    h = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(0))

    def agrees(how, side):
        mask = _masks()[side == "left"]
        got = fn(h.clone(), mask.clone(), how)
        assert isinstance(got, torch.Tensor), f"{how}: returned {type(got).__name__}, expected a tensor (batch, d)"
        assert tuple(got.shape) == (4, 5), f"{how}: shape {tuple(got.shape)}, expected (batch, d) = (4, 5)"
        want = _loop_pool(h, mask, how)
        got = got.detach().float()  # a float64 answer is as right as a float32 one
        bad = [b for b in range(4) if not torch.allclose(got[b], want[b], atol=1e-5)]
        assert not bad, f"{how} pooling with {side} padding is wrong for rows {bad} (real tokens per row: " \
                        f"{mask.sum(1).tolist()})"

    return run_checks("check_pooling", [
        ("last real token, right padding", "with right padding the last real token of a row is at position "
         "(number of real tokens − 1), not at −1 (that is padding)", lambda: agrees("last", "right")),
        ("last real token, left padding", "with left padding the last real token is at −1 for every row; "
         "one rule for both sides: the largest t with attention_mask[t] = 1", lambda: agrees("last", "left")),
        ("mean over real tokens", "sum h_t · m_t and divide by Σ m_t: padding must count neither in the sum "
         "nor in the count", lambda: (agrees("mean", "right"), agrees("mean", "left"))),
        ("first real token, left padding", "the first real token is the smallest t with attention_mask[t] = 1 "
         "(position 0 is padding under left padding)", lambda: (agrees("first", "left"), agrees("first", "right"))),
    ], learner=(fn,))


def check_regression_head(cls):
    """Check `cls(hidden_size)`: a module mapping z (B, d) to one unbounded number per row (B,), affine in z."""
    d, B = 8, 64
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, d, generator=g)

    def one_number():
        out = cls(d)(z)
        assert tuple(out.shape) == (B,), f"output shape {tuple(out.shape)}; expected ({B},): one number per " \
                                         f"example (a (B, 1) output broadcasts against (B,) labels in the MSE)"

    def affine():
        head = cls(d).eval()  # eval: a dropout in the head is fine (it is the identity at inference)
        a, b, zero = 10 * z[:8], 10 * z[8:16], torch.zeros(8, d)
        with torch.no_grad():
            lhs, rhs = head(a + b), head(a) + head(b) - head(zero)
        assert isinstance(lhs, torch.Tensor), f"the head returned {type(lhs).__name__}, expected a tensor"
        assert torch.allclose(lhs.float(), rhs.float(), atol=1e-3), \
            "head(a + b) ≠ head(a) + head(b) − head(0): the output is not w·z + b (a squashing function?)"

    def fits():
        torch.manual_seed(0)
        head = cls(d)
        w = torch.randn(d, generator=g)
        y = 4 * (z @ w) + 7.0  # values far outside [0, 1], and an offset
        X = torch.cat([z, torch.ones(B, 1)], 1)
        best = ((X @ torch.linalg.lstsq(X, y.unsqueeze(1)).solution).squeeze(1) - y).pow(2).mean()  # ≈ 0
        params = [p for p in head.parameters() if p.requires_grad]
        assert params, "the head has no trainable parameters"
        n_out = head(z).numel()
        assert n_out == B, f"{n_out} numbers for {B} examples: one number per example expected"
        opt = torch.optim.Adam(params, lr=0.1)
        for _ in range(400):
            loss = (head(z).reshape(-1) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()  # the fit is measured at inference (a dropout in the head is switched off)
        with torch.no_grad():
            loss = (head(z).reshape(-1).float() - y).pow(2).mean()
        assert loss.item() < best.item() + 0.05 * y.var().item(), \
            f"after 400 Adam steps the MSE is {loss.item():.3f} (variance of y {y.var().item():.1f}): the head " \
            f"cannot fit y = z·w + 7 (a bias missing? an output squashed into a range?)"

    return run_checks("check_regression_head", [
        ("one number per example", "return shape (B,): one output unit, then .squeeze(-1)", one_number),
        ("affine in z", "no sigmoid / tanh / ReLU on the output: a regression head is w·z + b", affine),
        ("fits a linear target with an offset", "a Linear(d, 1) with bias, trained with MSE, fits y = z·w + c", fits),
    ], learner=(cls,))


def check_mi_estimate(fn):
    """Check `fn(features (N, D) float array, labels (N,) int array) -> Î(Y; X)` in nats on two-class Gaussian
    mixtures with a known MI (`minipeft.mi.binary_gaussian_mi`)."""
    from ..mi import binary_gaussian_mi, sample_binary_gaussian

    def case(mu, dim, n, tol, seed=11):
        x, y = sample_binary_gaussian(mu, n, dim=dim, seed=seed)
        out = fn(x.reshape(n, -1).copy(), y.copy())
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().double().numpy()
        arr = np.asarray(out, dtype=np.float64)
        assert arr.size == 1, f"features of shape {(n, dim)}: returned {arr.size} numbers (shape {arr.shape}); " \
                              f"expected one, Î(Y; X) for the whole feature vector (mutual_info_classif gives one " \
                              f"per column: project first)"
        est = float(arr.reshape(()))
        truth = binary_gaussian_mi(mu)
        assert abs(est - truth) <= tol, f"μ = {mu} in {dim} dimension(s), N = {n}: estimate {est:.3f}, " \
                                        f"true MI {truth:.3f} nats (tolerance {tol})"
        return est

    def separated():
        est = case(2.5, 1, 2000, 0.05)
        assert est <= math.log(2) + 0.02, f"{est:.3f} nats exceeds H(Y) = log 2 = 0.693 for two balanced classes"

    return run_checks("check_mi_estimate", [
        ("two classes, one dimension (μ = 1)", "natural logarithms (nats); sklearn's mutual_info_classif "
         "returns nats: do not divide by log 2", lambda: case(1.0, 1, 2000, 0.05)),
        ("well-separated classes (μ = 2.5): at most log 2", "MI with two balanced classes is at most H(Y) = "
         "log 2 nats: report nats, and do not use the Gaussian formula −½ log(1 − ρ²) for a class label", separated),
        ("no information in 256 dimensions (N = 600)", "project without looking at the labels (PCA): a "
         "projection fitted to the labels on the same samples (e.g. LDA) finds separation in pure noise",
         lambda: case(0.0, 256, 600, 0.06)),
        ("the label on one direction of R^128 (μ = 1.5, N = 1000)", "k-NN estimates fall far short in 128 "
         "dimensions: project onto a few principal components first (and report nats)", lambda: case(1.5, 128, 1000, 0.08)),
    ], learner=(fn,))
