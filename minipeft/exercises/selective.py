"""Checks for the exercises of the chapter "Which weights to train" (FISH, PaFi, ID3).

    from minipeft.exercises import check_diagonal_fisher, check_top_k_mask, check_id3_step
    check_diagonal_fisher(my_fisher)    # my_fisher(model, xs, ys) -> {name: F}: the empirical diagonal Fisher
    check_top_k_mask(my_top_k)          # my_top_k(scores, k) -> {name: bool mask}: the k largest, all tensors together
    check_id3_step(my_id3_step)         # my_id3_step(grads, weights, masks, k, exp, eps) -> {name: bool mask}

The references are independent of the learner's code: per-example gradients with torch.func
(functional_call + vmap(grad)) for the Fisher, and torch.sort over all scores concatenated for the top k
and for ID3's pick among the entries not chosen yet. Scores are random floats, so the answer is unique.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ._runner import run_checks


# ---------------------------------------------------------------------------------------------------------
# FISH: the empirical diagonal Fisher
# ---------------------------------------------------------------------------------------------------------

def _classifiers() -> dict[str, nn.Module]:
    """Two small float64 classifiers (N, d) -> (N, C): an MLP with biases, and one with a LayerNorm and a
    bias-free head."""
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double(),
        "layernorm": nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(),
                                   nn.Linear(6, 4, bias=False)).double(),
    }


def _per_example_grads(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (N, *shape)}: ∂ log softmax(model(x_i))[y_i] / ∂θ for each example, by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    n_classes = model(xs[:1]).shape[-1]
    onehot = F.one_hot(ys, n_classes).to(xs.dtype)

    def log_p(params, x, y_onehot):
        logits = functional_call(model, params, (x[None],))[0]
        return (torch.log_softmax(logits, -1) * y_onehot).sum()

    return vmap(grad(log_p), in_dims=(None, 0, 0))(params, xs, onehot)


def _true_label_probs(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(N,) p(y_i | x_i): ∂p/∂θ = p · ∂log p/∂θ, which names the mistake of differentiating p itself."""
    with torch.no_grad():
        return torch.softmax(model(xs), -1).gather(1, ys[:, None])[:, 0]


def _data(model: nn.Module, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d = next(model.parameters()).shape[1]
    n_classes = model(torch.zeros(1, d, dtype=torch.float64)).shape[-1]
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, n_classes, (n,), generator=gen)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-8 * float(b.abs().max()) + 1e-12)


def _compare_fisher(got, want: dict[str, torch.Tensor], g: dict[str, torch.Tensor], label: str,
                    p: torch.Tensor | None = None):
    """got vs want per parameter; when wrong, say which known mistake the answer looks like."""
    assert isinstance(got, dict), f"{label}: returned {type(got).__name__}, expected a dict {{name: tensor}}"
    missing = [n for n in want if n not in got]
    assert not missing, f"{label}: no entry for {missing} (every named parameter needs one)"
    extra = [n for n in got if n not in want]
    assert not extra, f"{label}: names that are not parameters of the model: {extra}"
    for name, w in want.items():
        t = torch.as_tensor(got[name]).detach()
        assert tuple(t.shape) == tuple(w.shape), \
            f"{label}: {name} has shape {tuple(t.shape)}, the parameter's is {tuple(w.shape)}"
    wrong = [n for n in want if not _close(torch.as_tensor(got[n]).detach(), want[n])]
    if not wrong:
        return
    mistakes = {
        "the square of the mean gradient (mean g)² instead of the mean of the squares":
            {n: v.mean(0).square() for n, v in g.items()},
        "a sum over the examples, not divided by N": {n: v.square().sum(0) for n, v in g.items()},
        "|g| averaged instead of g²": {n: v.abs().mean(0) for n, v in g.items()},
        "the square of the summed gradient (the batch's loss summed, then squared)":
            {n: v.sum(0).square() for n, v in g.items()},
    }
    if p is not None:  # ∂p/∂θ = p ∂log p/∂θ
        mistakes["the gradient of the probability p(y|x), not of its log"] = {
            n: (v * p.reshape(-1, *[1] * (v.dim() - 1))).square().mean(0) for n, v in g.items()}
    looks = [what for what, alt in mistakes.items()
             if all(_close(torch.as_tensor(got[n]).detach(), alt[n]) for n in want)]
    n0 = wrong[0]
    err = float((torch.as_tensor(got[n0]).detach().double() - want[n0]).abs().max())
    raise AssertionError(f"{label}: wrong for {wrong[:3]}" + (" ..." if len(wrong) > 3 else "")
                         + f" (largest error {err:.3g} in {n0}, whose largest value is {float(want[n0].max()):.3g})"
                         + (f"; it looks like {looks[0]}" if looks else ""))


def check_diagonal_fisher(fn):
    """`fn(model, xs, ys) -> {name: F}`: for every named parameter, the empirical diagonal Fisher
    F = (1/N) Σ_i (∂ log softmax(model(x_i))[y_i] / ∂θ)², same shape as the parameter. xs: (N, d) floats,
    ys: (N,) integer labels, model(xs): (N, C) logits."""
    models = _classifiers()

    def on(name, n, seed):
        def check():
            model = models[name]
            xs, ys = _data(model, n, seed)
            g = _per_example_grads(model, xs, ys)
            want = {k: v.square().mean(0) for k, v in g.items()}
            p = _true_label_probs(model, xs, ys)
            _compare_fisher(fn(model, xs.clone(), ys.clone()), want, g, f"{name}, N={n}", p)
        return check

    def frozen_and_untouched():
        model = _classifiers()["mlp"]
        model[0].weight.requires_grad_(False)   # a frozen parameter is scored too
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        xs, ys = _data(model, 6, 3)
        g = _per_example_grads(model, xs, ys)
        got = fn(model, xs.clone(), ys.clone())
        changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert not changed, f"the model's parameters changed: {changed}"
        flipped = [n for n, p in model.named_parameters() if p.requires_grad != flags[n]]
        assert not flipped, f"requires_grad was left changed for {flipped} (it was {[flags[n] for n in flipped]})"
        _compare_fisher(got, {k: v.square().mean(0) for k, v in g.items()}, g, "mlp with a frozen 0.weight",
                        _true_label_probs(model, xs, ys))

    return run_checks(f"check_diagonal_fisher({getattr(fn, '__name__', fn)})", [
        ("one example (N=1): F = g², one tensor per parameter",
         "g = ∂ log softmax(model(x))[y] / ∂θ for each name in model.named_parameters() (the log of the "
         "probability, not the probability); return g² with the parameter's shape", on("mlp", 1, 0)),
        ("MLP with biases, N=16: the mean of the per-example squares",
         "take each example's gradient on its own (batch of one, or torch.func.vmap(grad(...))), square it, "
         "and average the squares over the N examples: (mean g)² is not mean(g²); divide by N; with .backward(), "
         "set every .grad to zero (or None) before each example, since backward adds to it", on("mlp", 16, 1)),
        ("LayerNorm model, N=5", "every named parameter counts, LayerNorm's weight and bias too; compute the "
         "gradient of log softmax at the true label y_i of each example", on("layernorm", 5, 2)),
        ("a frozen parameter is scored; the model is left as it was",
         "switch requires_grad on for the computation and put every flag back afterwards (torch.func needs no "
         "flags); never change the parameters themselves", frozen_and_untouched),
    ], learner=(fn,))


# ---------------------------------------------------------------------------------------------------------
# The global top k (FISH's and PaFi's mask)
# ---------------------------------------------------------------------------------------------------------

def _distinct(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = torch.cat([v.flatten() for v in t.values()])
    assert flat.unique().numel() == flat.numel(), "internal: the check's scores have ties"
    return t


def _score_sets() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return {
        "mixed": _distinct({"a": rand(4, 5), "b": rand(7), "c": rand(3, 2, 2)}),
        "one gets none": _distinct({"big": 1 + rand(3, 4), "small": rand(6) * 0.1 - 1, "mid": 0.5 + rand(2, 3)}),
        "one gets all": _distinct({"cold": rand(5, 3), "hot": 10 + rand(2, 3), "warm": rand(9)}),
        "negative": _distinct({"x": -torch.rand(4, 4, generator=gen, dtype=torch.float64),
                               "y": torch.randn(10, generator=gen, dtype=torch.float64)}),
    }


def _top_k_reference(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.flatten() for s in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True).indices[:k]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def _top_k_mistakes(scores: dict[str, torch.Tensor], k: int) -> dict[str, dict[str, torch.Tensor]]:
    total = sum(s.numel() for s in scores.values())
    per_tensor = {}
    for n, s in scores.items():
        per_tensor.update(_top_k_reference({n: s}, min(k, s.numel())))
    out = {"k per tensor, not k over all tensors together": per_tensor,
           "the k smallest scores, not the largest": _top_k_reference({n: -s for n, s in scores.items()}, k),
           "the k largest |score|, not the largest scores":
               _top_k_reference({n: s.abs() for n, s in scores.items()}, k)}
    if k < total:
        out["k + 1 entries: a threshold at the (k+1)-th largest score"] = _top_k_reference(scores, k + 1)
    return out


def _check_masks(got, want: dict[str, torch.Tensor], label: str, k_new: int | None = None,
                 looks: dict[str, dict[str, torch.Tensor]] | None = None):
    """got: the learner's {name: bool mask} against want (shapes, dtype, total count, then entry by entry).
    looks: {a known mistake: the masks it gives}, named in the message when the answer is one of them."""
    assert isinstance(got, dict), f"{label}: returned {type(got).__name__}, expected a dict {{name: bool tensor}}"
    missing = [n for n in want if n not in got]
    assert not missing, f"{label}: no mask for {missing} (return one per name, all False when it gets none)"
    for name, w in want.items():
        t = torch.as_tensor(got[name])
        assert tuple(t.shape) == tuple(w.shape), \
            f"{label}: mask {name} has shape {tuple(t.shape)}, expected {tuple(w.shape)}"
        assert t.dtype == torch.bool, f"{label}: mask {name} has dtype {t.dtype}, expected torch.bool"
    got = {n: torch.as_tensor(got[n]).detach().cpu() for n in want}
    like = [what for what, alt in (looks or {}).items() if all(torch.equal(got[n], alt[n]) for n in want)]
    like = f"; it looks like {like[0]}" if like else ""
    count = sum(int(got[n].sum()) for n in want)
    expected = sum(int(w.sum()) for w in want.values())
    assert count == expected, f"{label}: {count} entries chosen in total, expected {expected}" + \
        (f" (the ones already chosen + k = {k_new} new)" if k_new is not None else "") + like
    wrong = {n: int((got[n] != w).sum()) for n, w in want.items()}
    wrong = {n: c for n, c in wrong.items() if c}
    assert not wrong, f"{label}: the right number chosen but not the right entries; differing entries {wrong}" + like


def check_top_k_mask(fn):
    """`fn(scores, k) -> {name: bool mask}`: the k largest scores over all tensors together (global, not per
    tensor), as masks of the scores' shapes with exactly k True in total."""
    sets = _score_sets()

    def on(which, ks):
        def check():
            scores = sets[which]
            for k in ks:
                inputs = {n: s.clone() for n, s in scores.items()}
                got = fn(inputs, k)
                assert all(torch.equal(inputs[n], s) for n, s in scores.items()), "the scores were changed in place"
                _check_masks(got, _top_k_reference(scores, k), f"{which}, k={k}", looks=_top_k_mistakes(scores, k))
        return check

    n_mixed = sum(s.numel() for s in sets["mixed"].values())
    return run_checks(f"check_top_k_mask({getattr(fn, '__name__', fn)})", [
        ("three tensors, k = 10 and 11: the k largest overall",
         "concatenate every tensor's flattened scores, take the k largest (torch.topk or a descending sort), and "
         "cut the chosen positions back into one mask per tensor; exactly k True: with a threshold, compare "
         "against the k-th largest value itself (>=), not the (k+1)-th", on("mixed", (10, 11))),
        ("a tensor with only small scores gets none",
         "the budget is global: all tensors compete for the same k, so a tensor can get 0 entries (return its "
         "mask all False) — not k per tensor, not a share proportional to its size", on("one gets none", (5, 12))),
        ("a tensor with the largest scores gets all k",
         "one tensor may take the whole budget; the others then get nothing", on("one gets all", (3, 6))),
        ("k = 1 and k = every entry", "k = 1: only the single largest score; k = all: every mask all True",
         on("mixed", (1, n_mixed))),
        ("negative scores (PaFi's are −|θ|): the largest, not the largest in magnitude",
         "largest means largest value: -0.1 beats -0.9; do not take abs() of the scores", on("negative", (4, 9))),
    ], learner=(fn,))


# ---------------------------------------------------------------------------------------------------------
# ID3: one growth step
# ---------------------------------------------------------------------------------------------------------

def _d3(grads, weights, exp, eps):
    return {n: grads[n].abs() / (weights[n].abs() + eps) ** exp for n in grads}


def _id3_reference(grads, weights, masks, k, exp, eps) -> dict[str, torch.Tensor]:
    """Sort the D3 scores of the entries not chosen yet (all tensors together), add the k largest."""
    return _pick(_d3(grads, weights, exp, eps), masks, k)


def _pick(scores, masks, k) -> dict[str, torch.Tensor]:
    """masks plus the k largest scores among the entries they do not hold yet."""
    flat = torch.cat([scores[n].flatten() for n in scores])
    old = torch.cat([masks[n].flatten() for n in scores])
    free = (~old).nonzero().flatten()
    new = old.clone()
    new[free[torch.sort(flat[free], descending=True).indices[:k]]] = True
    out, start = {}, 0
    for n, g in scores.items():
        out[n] = new[start:start + g.numel()].view(g.shape)
        start += g.numel()
    return out


def _id3_mistakes(grads, weights, masks, k, exp, eps) -> dict[str, dict[str, torch.Tensor]]:
    new = _id3_reference(grads, weights, masks, k, exp, eps)
    repick = _top_k_reference(_d3(grads, weights, exp, eps), k)
    per_tensor = {n: _id3_reference({n: grads[n]}, {n: weights[n]}, {n: masks[n]}, k, exp, eps)[n] for n in grads}
    out = {
        "the chosen entries competing again (the top k of all entries, not of the unchosen ones)":
            {n: masks[n] | repick[n] for n in masks},
        "a fresh mask of the k new entries only (the chosen ones dropped)": {n: new[n] & ~masks[n] for n in masks},
        "k new entries in every tensor, not k over all tensors together": per_tensor,
        "the signed gradient g, not |g|": _pick({n: g / (weights[n].abs() + eps) ** exp for n, g in grads.items()},
                                                masks, k),
    }
    if exp != 1.0:
        out["exp ignored (D3 with exp = 1)"] = _id3_reference(grads, weights, masks, k, 1.0, eps)
    if exp not in (0.0, 1.0):
        out["eps outside the power: |g| / (|θ|**exp + eps), not |g| / (|θ| + eps)**exp"] = _pick(
            {n: g.abs() / (weights[n].abs() ** exp + eps) for n, g in grads.items()}, masks, k)
    if not any(m.any() for m in masks.values()):  # nothing chosen yet: these two are the right answer
        out.pop("a fresh mask of the k new entries only (the chosen ones dropped)")
        out.pop("the chosen entries competing again (the top k of all entries, not of the unchosen ones)")
    return out


def _id3_case(seed: int, chosen: str, exp: float, eps: float):
    """grads and weights (random, both signs), masks: "none", "random" (~30%) or "top" (the 8 largest D3)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layer1.weight": (6, 4), "layer1.bias": (6,), "layer2.weight": (3, 6)}
    grads = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    weights = {n: torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for n, s in shapes.items()}
    weights["layer1.bias"][:2] = torch.tensor([1e-4, -2e-4], dtype=torch.float64)  # near 0: eps matters
    if chosen == "none":
        masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    elif chosen == "random":
        masks = {n: torch.rand(s, generator=gen) < 0.3 for n, s in shapes.items()}
    else:  # the entries with the largest D3 are the ones already chosen
        masks = _top_k_reference(_d3(grads, weights, exp, eps), 8)
    _distinct(_d3(grads, weights, exp, eps))
    return grads, weights, masks


def check_id3_step(fn):
    """`fn(grads, weights, masks, k, exp, eps) -> {name: bool mask}`: one ID3 growth step. Among the entries
    not chosen yet (masks False), add the global top k by D3 = |g| / (|θ| + eps)^exp; chosen entries stay
    chosen; the input masks are not changed in place."""

    def on(seed, chosen, k, exp, eps):
        def check():
            grads, weights, masks = _id3_case(seed, chosen, exp, eps)
            got = fn({n: t.clone() for n, t in grads.items()}, {n: t.clone() for n, t in weights.items()},
                     {n: t.clone() for n, t in masks.items()}, k, exp, eps)
            _check_masks(got, _id3_reference(grads, weights, masks, k, exp, eps),
                         f"{chosen} chosen, k={k}, exp={exp}, eps={eps}", k_new=k,
                         looks=_id3_mistakes(grads, weights, masks, k, exp, eps))
        return check

    def inputs_untouched():
        grads, weights, masks = _id3_case(5, "random", 1.0, 1e-3)
        copies = {n: m.clone() for n, m in masks.items()}
        got = fn(grads, weights, masks, 4, 1.0, 1e-3)
        changed = [n for n in masks if not torch.equal(masks[n], copies[n])]
        assert not changed, f"the input masks {changed} were changed in place"
        _check_masks(got, _id3_reference(grads, weights, copies, 4, 1.0, 1e-3), "k=4, exp=1", k_new=4)

    return run_checks(f"check_id3_step({getattr(fn, '__name__', fn)})", [
        ("empty masks, exp = 1: the k largest D3 = |g| / (|θ| + eps)",
         "score every entry by |g| / (|θ| + eps)**exp (absolute values of both; eps inside the power), then "
         "take the k largest over all tensors together, not k per tensor", on(0, "none", 7, 1.0, 1e-3)),
        ("exp = 0: D3 is |g| alone", "(|θ| + eps)**0 = 1: with exp = 0 the weights do not matter; use the exp "
         "you are given", on(1, "random", 6, 0.0, 1e-3)),
        ("chosen entries with the largest D3 are not picked again",
         "exclude the chosen entries before the top k (e.g. set their scores to -inf): k NEW entries are added, "
         "and the chosen ones stay True (the union, not a fresh mask); here exp = 2: D3 = |g| / (|θ| + eps)**exp, eps "
         "inside the power", on(2, "top", 5, 2.0, 0.1)),
        ("the input masks are not changed in place",
         "build new masks (masks[name] | picked, or .clone() first); `|=` on the input tensors changes them",
         inputs_untouched),
    ], learner=(fn,))


__all__ = ["check_diagonal_fisher", "check_top_k_mask", "check_id3_step"]
