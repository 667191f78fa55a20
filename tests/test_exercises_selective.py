"""The exercise checks of "Which weights to train" (FISH, PaFi, ID3) pass for different correct solutions and
fail, on the right line, for typical mistakes; a solution that raises gives FAIL lines, never a traceback."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from minipeft.exercises import check_diagonal_fisher, check_id3_step, check_top_k_mask
from minipeft.selective import fisher_scores, top_k
from minipeft.selective.id3 import d3_scores


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


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


def fisher_backward(model, xs, ys):
    """.backward() on each example's negative log-likelihood, .grad read and cleared; flags put back."""
    named = list(model.named_parameters())
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    total = [torch.zeros_like(p) for _, p in named]
    for i in range(len(xs)):
        for _, p in named:
            p.grad = None
        nn.functional.nll_loss(torch.log_softmax(model(xs[i:i + 1]), -1), ys[i:i + 1]).backward()
        for t, (_, p) in zip(total, named):
            t += p.grad ** 2
    for (_, p), f in zip(named, flags):
        p.grad = None
        p.requires_grad_(f)
    return {n: t / len(xs) for t, (n, _) in zip(total, named)}


def fisher_backward_no_zero(model, xs, ys):  # .grad never cleared: each example adds to the last one's
    named = list(model.named_parameters())
    total = [torch.zeros_like(p) for _, p in named]
    for i in range(len(xs)):
        torch.log_softmax(model(xs[i:i + 1]), -1)[0, ys[i]].backward()
        for t, (_, p) in zip(total, named):
            t += p.grad ** 2 if p.grad is not None else 0
    return {n: t / len(xs) for t, (n, _) in zip(total, named)}


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


@pytest.mark.parametrize("good", [fisher_loop, fisher_vmap, fisher_backward,
                                  fisher_package])  # the package's fisher_scores agrees with the torch.func reference
def test_diagonal_fisher_correct(good):
    assert check_diagonal_fisher(good)


# N = 1 cannot tell a mean from a sum, nor (mean g)² from mean(g²): those fail from the second line on
@pytest.mark.parametrize("bad, fails", [
    (fisher_square_of_mean, [1, 2, 3]), (fisher_no_divide, [1, 2, 3]), (fisher_batch_loss, [1, 2, 3]),
    (fisher_backward_no_zero, [1, 2, 3]), (fisher_of_p, [0, 1, 2, 3]), (fisher_abs, [0, 1, 2, 3]),
    (fisher_trainable_only, [3]), (fisher_leaves_flags_on, [3]),
])
def test_diagonal_fisher_mistakes(bad, fails):
    report = check_diagonal_fisher(bad)
    assert not report and failing(report) == fails


def test_diagonal_fisher_names_the_mistake(capsys):
    check_diagonal_fisher(fisher_square_of_mean)
    assert "looks like the square of the mean gradient" in capsys.readouterr().out
    check_diagonal_fisher(fisher_no_divide)
    assert "not divided by N" in capsys.readouterr().out
    check_diagonal_fisher(fisher_of_p)
    assert "looks like the gradient of the probability" in capsys.readouterr().out


def test_diagonal_fisher_shape_and_raising(capsys):
    # a flattened tensor per parameter: the shape is named
    report = check_diagonal_fisher(lambda m, xs, ys: {n: f.flatten() for n, f in fisher_loop(m, xs, ys).items()})
    assert not report and failing(report) == [0, 1, 2, 3]
    assert "0.weight has shape (40,), the parameter's is (8, 5)" in capsys.readouterr().out

    def raises(model, xs, ys):  # a whole batch where one example is expected
        return {n: g ** 2 for n, g in zip(dict(model.named_parameters()),
                                          torch.autograd.grad(model(xs)[:, ys].log(), list(model.parameters())))}
    report = check_diagonal_fisher(raises)
    assert not report and failing(report) == [0, 1, 2, 3]


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


def top_k_argsort(scores, k):
    """argsort of the concatenation, each chosen flat index mapped back to its tensor by offsets."""
    names = list(scores)
    sizes = torch.tensor([scores[n].numel() for n in names])
    ends = sizes.cumsum(0)
    order = torch.cat([scores[n].reshape(-1) for n in names]).argsort(descending=True)[:k]
    masks = {n: torch.zeros(scores[n].numel(), dtype=torch.bool) for n in names}
    for i in order.tolist():
        t = int((ends <= i).sum())
        masks[names[t]][i - (ends[t] - sizes[t])] = True
    return {n: m.reshape(scores[n].shape) for n, m in masks.items()}


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


@pytest.mark.parametrize("good", [top_k_topk, top_k_threshold, top_k_argsort, top_k_package])
def test_top_k_mask_correct(good):
    assert check_top_k_mask(good)


# Most mistakes show on the first line already; its detail then names the mistake (next test).
@pytest.mark.parametrize("bad, fails", [
    (top_k_per_tensor, [0, 1, 2, 3, 4]), (top_k_smallest, [0, 1, 2, 3, 4]), (top_k_off_by_one, [0, 1, 2, 3, 4]),
    (top_k_density_per_tensor, [0, 1, 2, 3, 4]), (top_k_drops_empty, [0, 1, 2, 3, 4]),
    (top_k_magnitude, [4]),  # scores are positive until the last line
])
def test_top_k_mask_mistakes(bad, fails):
    report = check_top_k_mask(bad)
    assert not report and failing(report) == fails


@pytest.mark.parametrize("bad, named", [
    (top_k_per_tensor, "looks like k per tensor"), (top_k_smallest, "the k smallest scores"),
    (top_k_off_by_one, "k + 1 entries"), (top_k_magnitude, "the k largest |score|"),
    (top_k_drops_empty, "no mask for"),
])
def test_top_k_mask_names_the_mistake(bad, named, capsys):
    check_top_k_mask(bad)
    assert named in capsys.readouterr().out


def test_top_k_mask_wants_the_shapes(capsys):
    def flat_masks(scores, k):
        return {n: m.flatten() for n, m in top_k_topk(scores, k).items()}

    assert failing(check_top_k_mask(flat_masks)) == [0, 1, 2, 3, 4]
    assert "mask a has shape (20,), expected (4, 5)" in capsys.readouterr().out


def test_top_k_mask_raising_is_a_fail():
    report = check_top_k_mask(lambda scores, k: torch.topk(torch.cat(list(scores.values())), k))  # 2-D and 1-D
    assert not report and failing(report) == [0, 1, 2, 3, 4]


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


def id3_threshold(grads, weights, masks, k, exp, eps):
    """Chosen entries scored -1 (D3 >= 0), a threshold at the k-th largest score, the union with the masks."""
    scores = {n: torch.where(masks[n], torch.full_like(grads[n], -1.0),
                             grads[n].abs() * (weights[n].abs() + eps) ** -exp) for n in grads}
    flat = torch.cat([v.flatten() for v in scores.values()])
    kth = flat.sort().values[-k]
    return {n: masks[n].clone() | (v >= kth) for n, v in scores.items()}


def id3_eps_outside(grads, weights, masks, k, exp, eps):  # |g| / (|θ|**exp + eps)
    scores = {n: (grads[n].abs() / (weights[n].abs() ** exp + eps)).masked_fill(masks[n], -1.0) for n in grads}
    picks = top_k_topk(scores, k)
    return {n: masks[n] | picks[n] for n in masks}


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


@pytest.mark.parametrize("good", [id3_sort, id3_threshold, id3_package])
def test_id3_step_correct(good):
    assert check_id3_step(good)


@pytest.mark.parametrize("bad, fails", [
    (id3_repicks, [1, 2]),              # nothing chosen on the first line: it cannot show there
    (id3_no_exp, [1, 2]), (id3_eps_outside, [2]), (id3_replaces, [1, 2, 3]),
    (id3_per_tensor, [0, 1, 2, 3]), (id3_mutates, [3]), (id3_signed_grad, [0, 1, 2, 3]),
])
def test_id3_step_mistakes(bad, fails):
    report = check_id3_step(bad)
    assert not report and failing(report) == fails


@pytest.mark.parametrize("bad, named", [
    (id3_repicks, "the chosen entries competing again"), (id3_no_exp, "exp ignored"),
    (id3_eps_outside, "eps outside the power"), (id3_replaces, "a fresh mask of the k new entries"),
    (id3_per_tensor, "k new entries in every tensor"), (id3_signed_grad, "the signed gradient"),
])
def test_id3_step_names_the_mistake(bad, named, capsys):
    check_id3_step(bad)
    assert named in capsys.readouterr().out


def test_id3_step_shape_and_raising(capsys):
    report = check_id3_step(lambda *a: {n: m.flatten() for n, m in id3_sort(*a).items()})
    assert not report and failing(report) == [0, 1, 2, 3]
    assert "mask layer1.weight has shape (24,), expected (6, 4)" in capsys.readouterr().out
    report = check_id3_step(lambda grads, weights, masks, k, exp, eps: {n: masks[n] | (grads[n] > grads.kth) for n in
                                                                          masks})  # no attribute kth
    assert not report and failing(report) == [0, 1, 2, 3]


def test_unstarted_stubs_are_invitations(capsys):
    def my_code(*args):
        raise NotImplementedError("your code here")

    for check in (check_diagonal_fisher, check_top_k_mask, check_id3_step):
        report = check(my_code)
        assert not report and not report.attempted
    assert "FAIL" not in capsys.readouterr().out
