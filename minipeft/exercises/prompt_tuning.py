"""Checks for the Prompt tuning chapter's exercises.

    from minipeft.exercises import check_prepend_prompt, check_text_init, check_nearest_tokens
    check_prepend_prompt(my_prepend)   # my_prepend(P, embeds, mask, labels) -> (embeds', mask', labels')
    check_text_init(my_text_init)      # my_text_init(E, token_ids, L_p) -> (L_p, d) initial prompt
    check_nearest_tokens(my_nearest)   # my_nearest(P, E, k) -> (ids (L_p, k), cosine similarities (L_p, k))
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ._runner import run_checks

IGNORE = -100


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()


def check_prepend_prompt(fn, L: int = 4, B: int = 2, T: int = 6):
    """Check `fn(P, embeds, mask, labels) -> (embeds', mask', labels')` against minipeft's prompt tuning:
    the loss and logits of a tiny Llama fed the learner's tensors must equal those of mp.wrap(...)."""
    import minipeft as mp

    base = _tiny_llama()
    model = mp.wrap(base, mp.PromptTuningConfig(num_virtual_tokens=L))
    P = model.input_adapters["default"].prompt  # (L, d), requires grad
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2], ids[0, :2] = 0, 0  # row 0 is left-padded
    labels = ids.masked_fill(mask == 0, IGNORE)
    embeds = base.get_input_embeddings()(ids)  # (B, T, d)

    def shapes():
        e, m, lab = fn(P, embeds, mask, labels)
        d = embeds.shape[-1]
        assert tuple(e.shape) == (B, L + T, d), f"embeds' shape {tuple(e.shape)}, expected (B, L_p + T, d) = {(B, L + T, d)}"
        assert tuple(m.shape) == (B, L + T), f"mask' shape {tuple(m.shape)}, expected {(B, L + T)}"
        assert tuple(lab.shape) == (B, L + T), f"labels' shape {tuple(lab.shape)}, expected {(B, L + T)}"

    def content():
        e, m, lab = fn(P, embeds, mask, labels)
        assert all(torch.equal(e[b, :L], P.to(e.dtype)) for b in range(B)), "every row must start with P itself"
        assert torch.equal(e[:, L:], embeds), "the token embeddings must follow the prompt unchanged"
        assert bool((m[:, :L] == 1).all()), "the virtual tokens must be attended to: mask ones in front"
        assert torch.equal(m[:, L:], mask), "the original mask must follow, padding zeros kept"
        assert bool((lab[:, :L] == IGNORE).all()), "no loss on virtual tokens: labels -100 in front"
        assert torch.equal(lab[:, L:], labels), "the original labels must follow"

    def same_loss():
        e, m, lab = fn(P, embeds, mask, labels)
        got = base(inputs_embeds=e, attention_mask=m, labels=lab)
        want = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert got.logits.shape == want.logits.shape, \
            f"the model saw {got.logits.shape[1]} positions per row; expected L_p + T = {want.logits.shape[1]}"
        assert torch.allclose(got.logits, want.logits, atol=1e-5), "logits differ from minipeft's prompt tuning"
        assert abs(got.loss.item() - want.loss.item()) < 1e-5, "loss differs from minipeft's prompt tuning"

    def grad():
        P.grad = None
        e, m, lab = fn(P, embeds, mask, labels)
        base(inputs_embeds=e, attention_mask=m, labels=lab).loss.backward()
        if P.grad is not None and P.grad.abs().sum() > 0:
            return
        p = P.detach().to(e.dtype)
        if e.shape[1] >= L and torch.equal(e[0, -L:].detach(), p) and not torch.equal(e[0, :L].detach(), p):
            raise AssertionError("no gradient reaches P: it sits after the tokens, and in a causal LM a position "
                                 "only attends to earlier ones, so nothing that has a label ever sees P")
        raise AssertionError("no gradient reaches P although the loss was computed: is P detached, or copied into "
                             "a new tensor (torch.tensor(P), P.clone().detach())?")

    return run_checks("check_prepend_prompt", [
        ("shapes", "the prompt adds L_p positions to the sequence dimension (dim 1) of all three tensors", shapes),
        ("prompt, mask and labels in front", "every row starts with the same L_p prompt vectors; the mask must let "
         "the model attend to them; the labels must keep them out of the loss (-100)", content),
        ("same logits and loss as minipeft", "prompt first, then the tokens, in all three tensors", same_loss),
        ("gradient reaches P", "build the result from P itself (views such as expand keep the graph)", grad),
    ], learner=(fn,))


def check_text_init(fn, L: int = 7):
    """Check `fn(E, token_ids, L_p) -> (L_p, d)`: the embeddings of token_ids, repeated then cut to L_p,
    against minipeft's init="text"."""
    import minipeft as mp

    base = _tiny_llama()
    E = base.get_input_embeddings().weight.detach()

    def case(ids, n):
        want = mp.wrap(_tiny_llama(), mp.PromptTuningConfig(num_virtual_tokens=n, init="text",
                                                            init_token_ids=ids)).input_adapters["default"].prompt
        got = fn(E, ids, n)
        assert tuple(got.shape) == (n, E.shape[1]), f"shape {tuple(got.shape)}, expected (L_p, d) = {(n, E.shape[1])}"
        assert torch.allclose(got.float(), want, atol=0), f"token_ids={ids}, L_p={n}: rows differ from minipeft's"

    return run_checks("check_text_init", [
        ("text longer than L_p: cut", "keep the first L_p tokens", lambda: case(list(range(3, 3 + L + 4)), L)),
        ("text shorter than L_p: repeat", "repeat the whole id list ([a, b, c] → a b c a b c a), then cut",
         lambda: case([5, 9, 11], L)),
        ("exact length", "the prompt's rows are the embedding matrix's rows for those ids",
         lambda: case([1, 2, 3, 4, 5, 6, 7], L)),
    ], learner=(fn,))


def check_nearest_tokens(fn, L: int = 5, V: int = 40, d: int = 8, k: int = 3):
    """Check `fn(P, E, k) -> (ids, sims)`: per row of P the k rows of E with the highest cosine similarity,
    against a dense computation with torch.nn.functional.cosine_similarity."""
    torch.manual_seed(0)
    E = torch.randn(V, d) * torch.linspace(0.1, 5.0, V).unsqueeze(1)  # very different norms: dot ≠ cosine
    P = torch.randn(L, d)
    sims = nn.functional.cosine_similarity(P.unsqueeze(1), E.unsqueeze(0), dim=-1)  # (L, V)
    want_v, want_i = sims.topk(k, dim=-1)

    def shape():
        ids, s = fn(P, E, k)
        assert tuple(ids.shape) == (L, k) and tuple(s.shape) == (L, k), "ids and sims must both be (L_p, k)"

    def cosine():
        ids, s = fn(P, E, k)
        assert torch.allclose(s, want_v, atol=1e-5), \
            "similarities are not the top-k cosine values (normalise both P and E; a dot product favours long rows)"
        assert torch.equal(ids.long(), want_i), "token ids differ from the top-k of the cosine similarity"

    def sorted_desc():
        _, s = fn(P, E, k)
        assert bool((s[:, :-1] >= s[:, 1:]).all()), "sort each row from most to least similar"

    return run_checks("check_nearest_tokens", [
        ("shapes", "return (ids, sims), each (L_p, k)", shape),
        ("cosine top-k", "cosine similarity divides by both norms; a plain dot product favours long rows", cosine),
        ("sorted, best first", "each row from the most to the least similar", sorted_desc),
    ], learner=(fn,))
