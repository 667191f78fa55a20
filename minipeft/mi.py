r"""Mutual information I(Y; Z) between a label Y and a representation Z, in nats, by k nearest neighbours.

    I(Y; Z) = H(Y) − H(Y | Z) = E[ log p(z, y) / (p(z) p(y)) ]      (nats: natural log; bits = nats / log 2)

The estimators are scikit-learn's (`sklearn.feature_selection.mutual_info_classif` /
`mutual_info_regression`): no density is fitted, only distances to the k-th nearest neighbour are counted.

* Y discrete (a class) — Ross (2014): for sample i with label y_i, ρ_i is the distance to its k-th nearest
  neighbour among the N_{y_i} samples of its class and m_i the number of samples of any class within ρ_i;
      Î = ψ(N) + ψ(k) − ⟨ψ(N_{y_i})⟩ − ⟨ψ(m_i)⟩
* Y continuous (a number) — Kraskov, Stögbauer, Grassberger (2004), estimator 1: ρ_i is the distance to
  the k-th neighbour in the joint space (z, y) under the max-norm, n_z(i), n_y(i) the samples strictly within
  ρ_i in each space alone;
      Î = ψ(k) + ψ(N) − ⟨ψ(n_z + 1) + ψ(n_y + 1)⟩
(ψ = digamma, ⟨·⟩ = mean over samples.) scikit-learn applies them to one feature at a time (it returns one
number per column of Z, each I(Y; Z_j)); the formulas hold unchanged for a vector z with the max-norm,
so `mutual_information` runs them on the whole projected vector, with sklearn's neighbour searches
(`NearestNeighbors`, `KDTree`) and sklearn's preparation (each column divided by its standard deviation, a
1e-10 jitter that breaks ties, a negative estimate reported as 0). On one column it is exactly sklearn's
call, which the tests check.

Why a projection. The k-NN estimators are consistent, but in d dimensions the distances concentrate and
their bias grows quickly with d (Kraskov et al. §IV; Gao et al. 2015): a vector in R^64 that carries
0.34 nats about a two-class label (the label on one direction, `sample_binary_gaussian`) gets 0.15 nats from
2,000 samples, and 0.32 after PCA to 2 components (tests/test_mi.py). So Z is first
projected by PCA onto its top `n_components` directions. PCA does not look at Y, so it cannot invent
label information (a projection fitted to the labels on the same samples, e.g. LDA, would inflate the
estimate), and by the data processing inequality the projection can only lose information:
Î(Y; PCA(Z)) estimates a lower bound of I(Y; Z). The known cases below (Gaussians with closed forms) are
where a reader can see how close it comes.

Data processing inequality for pooling: pool(Z) is a function of Z, so I(Y; Z) ≥ I(Y; pool(Z)).
`dpi_gaussian` gives both sides in closed form for Z_t = m_t Y + ε_t (Y, ε_t standard normal, t = 1..T):
    I(Y; Z) = ½ log(1 + ‖m‖²),   I(Y; mean_t Z_t) = ½ log(1 + (Σ_t m_t)² / T)   (≤ by Cauchy–Schwarz).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def project(features, n_components: int | None = 4, seed: int = 0) -> np.ndarray:
    """(N, D) → (N, k): the scores on the top k principal components (PCA), or the features as they are when
    n_components is None or D ≤ k."""
    from sklearn.decomposition import PCA

    x = _numpy(features)
    x = x.reshape(len(x), -1)
    if n_components is None or x.shape[1] <= n_components:
        return x
    return PCA(n_components=n_components, random_state=seed).fit_transform(x)


def _ross(c: np.ndarray, d: np.ndarray, k: int) -> float:
    """Ross (2014), continuous c (N, p) and discrete d (N,): sklearn's `_compute_mi_cd` with the max-norm."""
    from scipy.special import digamma
    from sklearn.neighbors import KDTree, NearestNeighbors

    n = len(c)
    radius, counts, k_all = np.empty(n), np.empty(n), np.empty(n)
    for label in np.unique(d):
        mask = d == label
        count = int(mask.sum())
        if count > 1:
            kk = min(k, count - 1)
            r = NearestNeighbors(n_neighbors=kk, metric="chebyshev").fit(c[mask]).kneighbors()[0]
            radius[mask] = np.nextafter(r[:, -1], 0)  # strictly inside the k-th neighbour's distance
            k_all[mask] = kk
        counts[mask] = count
    keep = counts > 1  # a label seen once has no neighbour of its class: left out, as sklearn does
    c, radius, counts, k_all = c[keep], radius[keep], counts[keep], k_all[keep]
    m = KDTree(c, metric="chebyshev").query_radius(c, radius, count_only=True)  # includes the sample itself
    mi = digamma(keep.sum()) + digamma(k_all).mean() - digamma(counts).mean() - digamma(m).mean()
    return max(0.0, float(mi))


def _ksg(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Kraskov et al. (2004) estimator 1, x (N, p) and y (N, 1): sklearn's `_compute_mi_cc` for a vector x."""
    from scipy.special import digamma
    from sklearn.neighbors import KDTree, NearestNeighbors

    n = len(x)
    r = NearestNeighbors(n_neighbors=k, metric="chebyshev").fit(np.hstack([x, y])).kneighbors()[0]
    radius = np.nextafter(r[:, -1], 0)
    nx = KDTree(x, metric="chebyshev").query_radius(x, radius, count_only=True) - 1.0  # less the sample itself
    ny = KDTree(y, metric="chebyshev").query_radius(y, radius, count_only=True) - 1.0
    mi = digamma(n) + digamma(k) - digamma(nx + 1).mean() - digamma(ny + 1).mean()
    return max(0.0, float(mi))


def mutual_information(features, labels, discrete: bool | None = None, n_components: int | None = 4,
                       n_neighbors: int = 3, seed: int = 0) -> float:
    """Î(Y; Z) in nats: features Z (N,) or (N, D), labels Y (N,).

    discrete: Y is a class (Ross) or a number (KSG); None → a class when labels are integers or booleans.
    n_components: PCA to this many dimensions first (None: no projection; see the module docstring for why
    a high-dimensional Z needs one). n_neighbors: k (sklearn's default 3). seed: PCA and the tie-breaking jitter.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    if discrete is None:
        discrete = y.dtype.kind in "iub"
    z = _numpy(features)
    z = z.reshape(len(z), -1)
    if len(z) != len(y):
        raise ValueError(f"{len(z)} feature rows for {len(y)} labels")
    if len(y) <= n_neighbors:
        raise ValueError(f"need more than n_neighbors={n_neighbors} samples, got {len(y)}")
    if not np.isfinite(z).all():
        raise ValueError("features contain nan or inf")
    if (z == z[:1]).all():  # every row the same vector (e.g. one token at one position): no information
        return 0.0
    from sklearn.preprocessing import scale

    rng = np.random.RandomState(seed)
    z = scale(project(z, n_components, seed), with_mean=False)  # each column to unit standard deviation
    z = z + 1e-10 * np.maximum(1, np.abs(z).mean(0)) * rng.standard_normal(z.shape)  # break ties (as sklearn)
    if discrete:
        return _ross(z, y, n_neighbors)
    y = scale(y.astype(np.float64), with_mean=False)
    y = y + 1e-10 * max(1.0, np.abs(y).mean()) * rng.standard_normal(len(y))
    return _ksg(z, y.reshape(-1, 1), n_neighbors)


# ---- what a heatmap needs ---------------------------------------------------------------------------
@torch.no_grad()
def collect_hidden_states(model, tokenizer, texts: list[str], batch_size: int = 64):
    """Every layer's hidden states of `texts`: (hidden (L+1, N, T, d) float32 on cpu, attention_mask (N, T)).

    Left padding, so position T−1 is every text's last token (positions line up from the end). `model`: a
    Hugging Face model or a wrapped one (PeftModel, PooledModel); an input method's virtual tokens come first
    and count as real positions."""
    from .data import left_pad_prompts

    enc = left_pad_prompts(tokenizer, texts)  # one padding width for all batches
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    was_training = model.training
    model.eval()
    hs, masks = [], []
    try:
        for i in range(0, len(texts), batch_size):
            ids, mask = enc["input_ids"][i:i + batch_size], enc["attention_mask"][i:i + batch_size]
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
            h = torch.stack(out.hidden_states).float().cpu()  # (L+1, b, T', d)
            extra = h.shape[2] - mask.shape[1]  # virtual tokens of an input method, in front
            masks.append(torch.cat([mask.new_ones(len(mask), extra), mask], 1) if extra > 0 else mask)
            hs.append(h)
    finally:
        model.train(was_training)
    return torch.cat(hs, 1), torch.cat(masks, 0)


def mi_heatmap(hidden, labels, attention_mask=None, pooling: str = "mean", min_rows: int = 50,
               **kw) -> dict:
    """The (layer × position) MI grid and the MI of each layer's pooled vector, in nats.

    hidden: (L+1, N, T, d), e.g. from `collect_hidden_states`; labels (N,). Returns {"grid": (L+1, T) array,
    where grid[l, t] = Î(Y; h_t^l) over the rows whose position t is a real token (NaN when fewer than
    `min_rows` are: with left padding the early positions exist only for long inputs), "pooled": (L+1,)
    array of Î(Y; pool(h^l)), "rows": (T,) rows used per position}. Other arguments go to
    `mutual_information` (n_components, n_neighbors, discrete, seed)."""
    from .heads import pool

    hidden = hidden if isinstance(hidden, torch.Tensor) else torch.as_tensor(hidden)
    if hidden.dim() != 4:
        raise ValueError(f"hidden must be (layers, N, T, d), got shape {tuple(hidden.shape)}")
    Lp1, N, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(N, T, dtype=torch.long)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    real = attention_mask.bool().cpu()
    grid = np.full((Lp1, T), np.nan)
    rows = real.sum(0).numpy()
    for t in range(T):
        if rows[t] < min_rows:
            continue
        keep = real[:, t].numpy()
        for layer in range(Lp1):
            grid[layer, t] = mutual_information(hidden[layer, keep, t], y[keep], **kw)
    pooled = pool(hidden, attention_mask.to(hidden.device), pooling)  # (L+1, N, d)
    return {"grid": grid, "pooled": np.array([mutual_information(p, y, **kw) for p in pooled]), "rows": rows}


# ---- known cases: samples and their true MI ---------------------------------------------------------
def gaussian_mi(rho: float) -> float:
    """Jointly Gaussian scalars X, Y with correlation ρ: I = −½ log(1 − ρ²)."""
    if not -1 < rho < 1:
        raise ValueError(f"rho must lie in (-1, 1), got {rho}")
    return -0.5 * math.log(1 - rho * rho)


def sample_gaussian(rho: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n draws of (X, Y), standard normal with correlation ρ."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    return x, rho * x + math.sqrt(1 - rho * rho) * rng.standard_normal(n)


def binary_gaussian_mi(mu: float, points: int = 20001) -> float:
    """Y = ±1 with probability ½, X | Y ~ N(Y·μ, 1): I(X; Y) = h(X) − h(X | Y) by the trapezoidal rule on a
    grid over μ ± 12 (no closed form). h(X|Y) = ½ log(2πe); p(x) is the two-component mixture."""
    x = np.linspace(-abs(mu) - 12, abs(mu) + 12, points)
    p = 0.5 * (np.exp(-0.5 * (x - mu) ** 2) + np.exp(-0.5 * (x + mu) ** 2)) / math.sqrt(2 * math.pi)
    h_x = -np.trapezoid(p * np.log(np.maximum(p, 1e-300)), x) if hasattr(np, "trapezoid") else \
        -np.trapz(p * np.log(np.maximum(p, 1e-300)), x)
    return float(h_x - 0.5 * math.log(2 * math.pi * math.e))


def sample_binary_gaussian(mu: float, n: int, dim: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n draws of (X, Y): Y ∈ {0, 1} with probability ½, X = (2Y − 1)·μ·u + ε in R^dim with ε ~ N(0, I) and u a
    random unit vector (dim = 1: u = 1). I(X; Y) = binary_gaussian_mi(μ) for every dim: only u·X carries Y."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = rng.standard_normal(dim)
    u = u / np.linalg.norm(u) if dim > 1 else np.ones(1)
    x = (2 * y - 1)[:, None] * mu * u + rng.standard_normal((n, dim))
    return (x[:, 0] if dim == 1 else x), y


def dpi_gaussian(m) -> tuple[float, float]:
    """(I(Y; Z), I(Y; mean_t Z_t)) for Z_t = m_t Y + ε_t, Y and ε_t independent standard normals (nats)."""
    m = np.asarray(m, dtype=np.float64)
    return 0.5 * math.log(1 + float(m @ m)), 0.5 * math.log(1 + float(m.sum()) ** 2 / len(m))


def sample_dpi_gaussian(m, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n draws of (Z (n, T), Y (n,)) for `dpi_gaussian`'s model: a sequence of T scalar features."""
    m = np.asarray(m, dtype=np.float64)
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    return y[:, None] * m + rng.standard_normal((n, len(m))), y
