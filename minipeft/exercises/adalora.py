"""Checks for the AdaLoRA chapter's exercises.

    from minipeft.exercises import check_sensitivity, check_budget_schedule, check_triplet_scores
    check_sensitivity(my_sensitivity)          # my_sensitivity(w, grad) -> I, same shape as w
    check_budget_schedule(my_budget)           # my_budget(step, total_step, tinit, tfinal, b0, bT) -> int
    check_triplet_scores(my_triplet_scores)    # my_triplet_scores(s_E, s_A, s_B) -> S of shape (r,)

The references are autograd and a real loss change (sensitivity) and minipeft's own functions
(`minipeft.reparam.adalora.budget_schedule`, `triplet_scores`).
"""
from __future__ import annotations

import torch
from torch import nn

from ._runner import run_checks


def _tiny_regression():
    """A small two-layer net, a fixed batch and its loss; weights small enough for first-order Taylor."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    return net, lambda: (net(x) - y).square().mean()


def check_sensitivity(fn):
    """Check `fn(w, grad) -> I`, AdaLoRA's sensitivity of every entry of a weight tensor w."""
    net, loss_fn = _tiny_regression()
    W = net[0].weight  # (8, 6)
    g, = torch.autograd.grad(loss_fn(), W)

    def call():
        out = fn(W.detach().clone(), g.clone())
        out = torch.as_tensor(out)
        assert tuple(out.shape) == tuple(W.shape), \
            f"I has shape {tuple(out.shape)}; expected w's shape {tuple(W.shape)}: one score per entry"
        return out.double()

    def shape_sign():
        assert bool((call() >= 0).all()), "some scores are negative: a sensitivity is a size, not a direction"

    def autograd():
        assert torch.allclose(call(), (W * g).abs().detach(), rtol=1e-6, atol=1e-12), \
            "differs from |w · ∂L/∂w| computed with autograd"

    def taylor():
        I = call()
        base = loss_fn().item()
        picks = torch.topk(I.flatten(), 3).indices.tolist()  # the three most sensitive entries
        with torch.no_grad():
            for k in picks:
                i, j = divmod(k, W.shape[1])
                w = W[i, j].item()
                W[i, j] = 0.0
                change = abs(loss_fn().item() - base)  # the real loss change when w_ij is set to 0
                W[i, j] = w
                assert abs(I[i, j].item() - change) <= 0.25 * change, (
                    f"entry ({i}, {j}): score {I[i, j].item():.2e}, but zeroing it changes the loss "
                    f"by {change:.2e}")

    return run_checks(f"check_sensitivity({getattr(fn, '__name__', fn)})", [
        ("one score per entry, never negative", "take the absolute value of the product", shape_sign),
        ("I = |w · ∂L/∂w| (autograd)", "multiply the weight by its own gradient, entry by entry", autograd),
        ("predicts the loss change of zeroing w", "first-order Taylor: L(w=0) − L(w) ≈ −w · ∂L/∂w", taylor),
    ], learner=(fn,))


def _unpack_budget(value):
    if isinstance(value, (tuple, list)):  # (budget, mask?) like minipeft's own function: keep the budget
        value = value[0]
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value


def check_budget_schedule(fn):
    """Check `fn(step, total_step, tinit, tfinal, init_budget, target_budget) -> b(t)` against
    `minipeft.reparam.adalora.budget_schedule` (the cubic schedule, paper Eq. 12)."""
    from ..reparam.adalora import budget_schedule

    settings = [(200, 20, 60, 112, 56), (100, 0, 0, 96, 64), (500, 50, 100, 12 * 72, 8 * 72)]

    def b(step, T, ti, tf, b0, bT):
        return _unpack_budget(fn(step, T, ti, tf, b0, bT))

    def warmup():
        for T, ti, tf, b0, bT in settings:
            for t in range(0, ti + 1):
                assert b(t, T, ti, tf, b0, bT) == b0, f"b({t}) = {b(t, T, ti, tf, b0, bT)} during the " \
                    f"warm-up (t <= tinit = {ti}); expected b(0) = {b0}"

    def final():
        for T, ti, tf, b0, bT in settings:
            for t in range(T - tf, T + 1):
                assert b(t, T, ti, tf, b0, bT) == bT, f"b({t}) = {b(t, T, ti, tf, b0, bT)} with T = {T}, " \
                    f"tfinal = {tf}; expected the target {bT} from step T − tfinal on"

    def cubic():
        for T, ti, tf, b0, bT in settings:
            for t in range(ti + 1, T - tf):
                want = budget_schedule(t, T, ti, tf, b0, bT)[0]
                got = b(t, T, ti, tf, b0, bT)
                assert abs(got - want) <= 1, f"b({t}) = {got} with T = {T}, tinit = {ti}, tfinal = {tf}; " \
                    f"expected {want}"

    return run_checks(f"check_budget_schedule({getattr(fn, '__name__', fn)})", [
        ("b(t) = b(0) during the warm-up", "no pruning while t <= tinit", warmup),
        ("b(t) = b(T) from T − tfinal on", "the pruning window ends at T − tfinal, not at T", final),
        ("cubic decrease in between", "b(T) + (b(0) − b(T))·(1 − (t − tinit)/(T − tfinal − tinit))³, "
                                      "rounded down", cubic),
    ], learner=(fn,))


def check_triplet_scores(fn):
    """Check `fn(s_E, s_A, s_B) -> S` (r,), the score of each triplet from the entry scores s = Ī·Ū of
    λ (r, 1), Q = lora_A (r, d_in) and P = lora_B (d_out, r), against minipeft's `triplet_scores`."""
    from ..reparam.adalora import triplet_scores

    gen = torch.Generator().manual_seed(0)
    r, d_in, d_out = 4, 6, 9
    s_E, s_A, s_B = (torch.rand(shape, generator=gen) for shape in [(r, 1), (r, d_in), (d_out, r)])

    def call(E, A, B):
        out = torch.as_tensor(fn(E.clone(), A.clone(), B.clone()))
        assert out.numel() == r, f"{out.numel()} scores (shape {tuple(out.shape)}), expected one per triplet: " \
            f"shape (r,) = ({r},)" + (" — s_E is (r, 1): adding an (r,) vector to it broadcasts to (r, r); "
                                      "flatten s_E first" if tuple(out.shape) == (r, r) else "")
        return out.reshape(-1)

    def shape():
        call(s_E, s_A, s_B)

    def values():
        assert torch.allclose(call(s_E, s_A, s_B), triplet_scores(s_E, s_A, s_B), atol=1e-6), \
            "differs from S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)"

    def width_free():  # copying every column of Q and every row of P doubles d, not the importance
        wide = call(s_E, torch.cat([s_A, s_A], dim=1), torch.cat([s_B, s_B], dim=0))
        assert torch.allclose(wide, call(s_E, s_A, s_B), atol=1e-6), \
            "a matrix twice as wide with the same entry scores gets different triplet scores"

    return run_checks(f"check_triplet_scores({getattr(fn, '__name__', fn)})", [
        ("one score per triplet", "Q's row i and P's column i belong to triplet i", shape),
        ("S_i = s(λ_i) + mean s(Q_i,:) + mean s(P_:,i)", "average over Q's row and P's column, add λ's", values),
        ("does not grow with the width of P and Q", "mean, not sum: d_in and d_out differ across matrices",
         width_free),
    ], learner=(fn,))
