"""The exercise checks of "Which weights to train" (FISH, PaFi, ID3) pass for correct solutions and fail for
typical mistakes."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from minipeft.exercises import check_diagonal_fisher, check_id3_step, check_top_k_mask
from minipeft.selective import fisher_scores, top_k
from minipeft.selective.id3 import d3_scores


# --- the diagonal Fisher -----------------------------------------------------------------------------------

def squared_grads_loop(model, xs, ys, target):
    """(1/N) Σ_i (∂ target(logits_i, y_i) / ∂θ)², one example at a time with autograd.grad; flags switched
    on and put back."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for x, y in zip(xs, ys):
            grads = torch.autograd.grad(target(model(x[None])[0], y), list(params.values()))
            for n, g in zip(params, grads):
                out[n] += g.square()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {n: s / len(xs) for n, s in out.items()}


def fisher_loop(model, xs, ys):
    return squared_grads_loop(model, xs, ys, lambda logits, y: torch.log_softmax(logits, -1)[y])


def fisher_vmap(model, xs, ys):
    """Per-example gradients with torch.func (no requires_grad needed), via cross-entropy = -log p."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    g = vmap(grad(nll), in_dims=(None, 0, 0))(params, xs, ys)
    return {n: v.square().mean(0) for n, v in g.items()}


def fisher_package(model, xs, ys):
    """minipeft's own fisher_scores, through a wrapper with the `.logits` and batch-dict interface it expects."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return SimpleNamespace(logits=self.net(x))

    wrapped = Wrapped()
    params = dict(model.named_parameters())

    def collate(exs):
        return {"x": torch.stack([e[0] for e in exs]), "labels": torch.stack([e[1] for e in exs])}

    return fisher_scores(wrapped, list(zip(xs, ys)), collate, params=params)


def fisher_vmap_grads(model, xs, ys):
    """{name: (N, *shape)} per-example gradients of log p(y|x), for the mistakes below."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logp(params, x, y):
        return -nn.functional.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    return vmap(grad(logp), in_dims=(None, 0, 0))(params, xs, ys)


def fisher_square_of_mean(model, xs, ys):  # (mean g)² instead of mean(g²)
    g = fisher_vmap_grads(model, xs, ys)
    return {n: v.mean(0).square() for n, v in g.items()}


def fisher_of_p(model, xs, ys):  # gradient of p, not of log p
    return squared_grads_loop(model, xs, ys, lambda logits, y: torch.softmax(logits, -1)[y])


def fisher_no_divide(model, xs, ys):  # forgot 1/N
    return {n: v.square().sum(0) for n, v in fisher_vmap_grads(model, xs, ys).items()}


def fisher_batch_loss(model, xs, ys):  # one backward of the batch's summed log-likelihood, squared
    params = list(model.parameters())
    logp = torch.log_softmax(model(xs), -1).gather(1, ys[:, None]).sum()
    gs = torch.autograd.grad(logp, params)
    return {n: g.square() / len(xs) for (n, _), g in zip(model.named_parameters(), gs)}


def fisher_abs(model, xs, ys):  # |g| instead of g²
    return {n: v.abs().mean(0) for n, v in fisher_vmap_grads(model, xs, ys).items()}


def fisher_trainable_only(model, xs, ys):  # skips frozen parameters
    full = fisher_loop(model, xs, ys)
    return {n: full[n] for n, p in model.named_parameters() if p.requires_grad}


def fisher_leaves_flags_on(model, xs, ys):  # correct numbers, but every parameter left trainable
    for p in model.parameters():
        p.requires_grad_(True)
    return fisher_loop(model, xs, ys)


def test_diagonal_fisher_correct():
    assert check_diagonal_fisher(fisher_loop)
    assert check_diagonal_fisher(fisher_vmap)
    assert check_diagonal_fisher(fisher_package)  # the package's fisher_scores agrees with the torch.func reference


@pytest.mark.parametrize("bad", [fisher_square_of_mean, fisher_of_p, fisher_no_divide, fisher_batch_loss,
                                 fisher_abs, fisher_trainable_only, fisher_leaves_flags_on])
def test_diagonal_fisher_mistakes(bad):
    assert not check_diagonal_fisher(bad)


def test_diagonal_fisher_names_the_mistake(capsys):
    check_diagonal_fisher(fisher_square_of_mean)
    assert "looks like the square of the mean gradient" in capsys.readouterr().out
    check_diagonal_fisher(fisher_no_divide)
    assert "not divided by N" in capsys.readouterr().out


# --- the global top k --------------------------------------------------------------------------------------

def top_k_topk(scores, k):
    flat = torch.cat([s.flatten() for s in scores.values()])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k).indices] = True
    parts = chosen.split([s.numel() for s in scores.values()])
    return {n: m.view(s.shape) for (n, s), m in zip(scores.items(), parts)}


def top_k_threshold(scores, k):
    flat = torch.cat([s.flatten() for s in scores.values()])
    kth = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest
    return {n: s >= kth for n, s in scores.items()}


def top_k_package(scores, k):
    idx = top_k(scores, k)
    out = {}
    for n, s in scores.items():
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[idx.get(n, torch.empty(0, dtype=torch.long))] = True
        out[n] = m.view(s.shape)
    return out


def top_k_per_tensor(scores, k):
    return {n: top_k_topk({n: s}, min(k, s.numel()))[n] for n, s in scores.items()}


def top_k_smallest(scores, k):
    return top_k_topk({n: -s for n, s in scores.items()}, k)


def top_k_off_by_one(scores, k):  # threshold at the (k+1)-th largest with >=: k + 1 entries
    flat = torch.cat([s.flatten() for s in scores.values()])
    kth = flat.sort(descending=True).values[min(k, flat.numel() - 1)]
    return {n: s >= kth for n, s in scores.items()}


def top_k_density_per_tensor(scores, k):  # each tensor keeps its share k · n_t / N
    total = sum(s.numel() for s in scores.values())
    return {n: top_k_topk({n: s}, max(1, round(k * s.numel() / total)))[n] for n, s in scores.items()}


def top_k_magnitude(scores, k):  # largest |score|
    return top_k_topk({n: s.abs() for n, s in scores.items()}, k)


def top_k_drops_empty(scores, k):  # names that get nothing are left out
    return {n: m for n, m in top_k_topk(scores, k).items() if m.any()}


def test_top_k_mask_correct():
    for good in (top_k_topk, top_k_threshold, top_k_package):
        assert check_top_k_mask(good), good.__name__


@pytest.mark.parametrize("bad", [top_k_per_tensor, top_k_smallest, top_k_off_by_one, top_k_density_per_tensor,
                                 top_k_magnitude, top_k_drops_empty])
def test_top_k_mask_mistakes(bad):
    assert not check_top_k_mask(bad)


def test_top_k_mask_wants_the_shapes(capsys):
    def flat_masks(scores, k):
        return {n: m.flatten() for n, m in top_k_topk(scores, k).items()}

    assert not check_top_k_mask(flat_masks)
    assert "has shape" in capsys.readouterr().out


# --- one ID3 step ------------------------------------------------------------------------------------------

def id3_sort(grads, weights, masks, k, exp, eps):
    """Chosen entries scored -inf, one descending sort over everything, the first k added."""
    scores = torch.cat([(grads[n].abs() / (weights[n].abs() + eps) ** exp).masked_fill(masks[n], float("-inf"))
                        .flatten() for n in grads])
    picked = torch.zeros_like(scores, dtype=torch.bool)
    picked[scores.sort(descending=True).indices[:k]] = True
    parts = picked.split([g.numel() for g in grads.values()])
    return {n: masks[n] | p.view(masks[n].shape) for n, p in zip(grads, parts)}


def id3_package(grads, weights, masks, k, exp, eps):
    """minipeft's d3_scores and top_k; chosen entries get -1 (D3 >= 0), as ID3Grower does."""
    scores = {n: d3_scores(grads[n], weights[n], exp, eps).masked_fill(masks[n], -1.0) for n in grads}
    idx = top_k(scores, k)
    out = {}
    for n, m in masks.items():
        new = m.clone().flatten()
        if n in idx:
            new[idx[n]] = True
        out[n] = new.view(m.shape)
    return out


def id3_repicks(grads, weights, masks, k, exp, eps):  # chosen entries compete again
    d3 = {n: grads[n].abs() / (weights[n].abs() + eps) ** exp for n in grads}
    return {n: masks[n] | p for n, p in top_k_topk(d3, k).items()}


def id3_no_exp(grads, weights, masks, k, exp, eps):  # always divides by |θ| + eps
    return id3_sort(grads, weights, masks, k, 1.0, eps)


def id3_replaces(grads, weights, masks, k, exp, eps):  # a fresh mask of the k new picks only
    new = id3_sort(grads, weights, masks, k, exp, eps)
    return {n: new[n] & ~masks[n] for n in masks}


def id3_per_tensor(grads, weights, masks, k, exp, eps):  # k picks in every tensor
    return {n: id3_sort({n: grads[n]}, {n: weights[n]}, {n: masks[n]}, k, exp, eps)[n] for n in grads}


def id3_mutates(grads, weights, masks, k, exp, eps):  # |= on the input masks
    new = id3_sort(grads, weights, masks, k, exp, eps)
    for n in masks:
        masks[n] |= new[n]
    return masks


def id3_signed_grad(grads, weights, masks, k, exp, eps):  # g instead of |g|: large negative gradients lose
    scores = torch.cat([(grads[n] / (weights[n].abs() + eps) ** exp).masked_fill(masks[n], float("-inf"))
                        .flatten() for n in grads])
    picked = torch.zeros_like(scores, dtype=torch.bool)
    picked[scores.sort(descending=True).indices[:k]] = True
    parts = picked.split([g.numel() for g in grads.values()])
    return {n: masks[n] | p.view(masks[n].shape) for n, p in zip(grads, parts)}


def test_id3_step_correct():
    assert check_id3_step(id3_sort)
    assert check_id3_step(id3_package)


@pytest.mark.parametrize("bad", [id3_repicks, id3_no_exp, id3_replaces, id3_per_tensor, id3_mutates, id3_signed_grad])
def test_id3_step_mistakes(bad):
    assert not check_id3_step(bad)


def test_id3_mutation_fails_only_its_own_check():
    report = check_id3_step(id3_mutates)
    assert [ok for _, ok in report] == [True, True, True, False]


def test_unstarted_stubs_are_invitations(capsys):
    def my_code(*args):
        raise NotImplementedError("your code here")

    for check in (check_diagonal_fisher, check_top_k_mask, check_id3_step):
        report = check(my_code)
        assert not report and not report.attempted
    assert "FAIL" not in capsys.readouterr().out
