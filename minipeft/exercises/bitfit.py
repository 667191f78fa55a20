"""Checks for the BitFit chapter's exercises.

    from minipeft.exercises import check_count_biases, check_biases_only, check_key_bias_shift
    check_count_biases(my_count)        # my_count(model) -> int: entries of every bias parameter
    check_biases_only(my_mark)          # my_mark(model) -> None: requires_grad only on the biases
    check_key_bias_shift(my_shift)      # my_shift(Q, b_k) -> (T_q, T_k): the change of the logits QKᵀ/√d

The references are independent of the learner's code: small BERT, GPT-2 and Llama models built from
transformers' own classes, counts read from `named_parameters()`, PyTorch's softmax attention.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._runner import run_checks


def _models() -> dict[str, nn.Module]:
    """Three tiny random models: BERT (Linear biases + LayerNorm β), GPT-2 (Conv1D biases, not nn.Linear),
    Llama (no bias at all)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, \
        LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        return {
            "bert": BertForSequenceClassification(BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)),
            "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                               bos_token_id=0, eos_token_id=0)),
            "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1,
                                                  intermediate_size=24, max_position_embeddings=32)),
        }
    finally:
        logging.set_verbosity(old)


def _bias_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.split(".")[-1] == "bias"}


class _MaskedAttention(nn.Module):
    """A layer that keeps a causal mask as a buffer named `bias`, as GPT-2's attention did in older transformers:
    in the state_dict, not a parameter, never trained."""

    def __init__(self, d: int = 8, T: int = 6):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(T, T, dtype=torch.bool)))


def check_count_biases(fn):
    """`fn(model) -> int`: the number of bias entries (every parameter named "bias", LayerNorm β included)."""
    models = {**_models(), "buffer": _MaskedAttention()}

    def on(name):
        def check():
            m = models[name]
            want = sum(p.numel() for n, p in m.named_parameters() if n.split(".")[-1] == "bias")
            got = fn(m)
            assert int(got) == want, f"{name}: got {got}, the model's bias parameters hold {want} entries"
        return check

    return run_checks(f"check_count_biases({getattr(fn, '__name__', fn)})", [
        ("BERT (Linear + LayerNorm biases)", "count parameters whose name ends in 'bias' "
         "(model.named_parameters()); LayerNorm's β is one of them", on("bert")),
        ("GPT-2 (Conv1D biases)", "GPT-2's layers are Conv1D, not nn.Linear: go by parameter names, not module "
         "types", on("gpt2")),
        ("Llama (no biases: 0)", "Llama's Linear layers have bias=False and RMSNorm has no β", on("llama")),
        ("a buffer named bias is not counted", "count parameters (named_parameters()), not state_dict() entries: "
         "a registered buffer such as a causal mask called `bias` is saved but never trained", on("buffer")),
    ], learner=(fn,))


def check_biases_only(fn, steps: int = 3):
    """`fn(model)` marks the biases trainable and everything else frozen, for a plain PyTorch training loop."""
    model = _models()["bert"]
    biases = _bias_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    marked = []

    def mark():  # the learner's function runs inside the first check: an error there is a FAIL with a hint
        if not marked:
            marked.append(True)
            fn(model)

    def pattern():
        mark()
        wrong = [n for n, p in model.named_parameters() if p.requires_grad != (n in biases)]
        assert not wrong, f"requires_grad is wrong for {wrong[:4]}" + (" ..." if len(wrong) > 4 else "")

    def count():
        mark()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        want = sum(p.numel() for n_, p in model.named_parameters() if n_ in biases)
        assert n == want, f"{n} trainable entries, the biases hold {want}"

    def training():
        mark()
        torch.manual_seed(1)
        x, y = torch.randint(0, 50, (8, 10)), torch.randint(0, 2, (8,))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=x, labels=y).loss.backward()
            opt.step()
        after = dict(model.named_parameters())
        moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
        assert moved, "nothing changed in training: are the biases trainable?"
        wrong = [n for n in moved if n not in biases]
        assert not wrong, f"training changed non-bias parameters: {wrong[:4]}"

    return run_checks(f"check_biases_only({getattr(fn, '__name__', fn)})", [
        ("requires_grad exactly on the biases", "loop over model.named_parameters() and set "
         "p.requires_grad = name ends with 'bias'", pattern),
        ("trainable count = bias count", "freeze every weight, LayerNorm γ and the embeddings too", count),
        ("training changes only biases", "build the optimizer from the parameters that require grad", training),
    ], learner=(fn,))


def check_key_bias_shift(fn, T_q: int = 5, T_k: int = 7, d: int = 8):
    """`fn(Q, b_k) -> (T_q, T_k)`: how much the scaled logits S = Q Kᵀ/√d change when every key gets b_k added,
    for queries Q (T_q, d). Checked against a dense computation; then: each row is constant, so softmax cancels it."""
    torch.manual_seed(0)
    Q, K, V, b_k = (torch.randn(T_q, d, dtype=torch.float64), torch.randn(T_k, d, dtype=torch.float64),
                    torch.randn(T_k, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64))
    shift = lambda: torch.as_tensor(fn(Q, b_k), dtype=torch.float64)  # noqa: E731

    def dense():
        want = (Q @ (K + b_k).T - Q @ K.T) / math.sqrt(d)  # (T_q, T_k)
        got = shift()
        assert got.shape == (T_q, T_k), f"shape {tuple(got.shape)}, expected (T_q, T_k) = {(T_q, T_k)}"
        assert torch.allclose(got, want, atol=1e-10), "not equal to (Q (K + b_k)ᵀ − Q Kᵀ)/√d"

    def rows_constant():
        got = shift()
        assert torch.allclose(got, got[:, :1].expand_as(got), atol=1e-10), "a row of the shift is not constant"

    def softmax_cancels():
        s = Q @ K.T / math.sqrt(d)
        assert torch.allclose(torch.softmax(s + shift(), -1), torch.softmax(s, -1), atol=1e-12)
        out0 = torch.nn.functional.scaled_dot_product_attention(Q[None], K[None], V[None])
        out1 = torch.nn.functional.scaled_dot_product_attention(Q[None], (K + b_k)[None], V[None])
        assert torch.allclose(out0, out1, atol=1e-10), "PyTorch's attention changed with b_k (unexpected)"

    return run_checks(f"check_key_bias_shift({getattr(fn, '__name__', fn)})", [
        ("shift = (Q b_k)/√d for every key", "expand (q_i)ᵀ(k_j + b_k) − (q_i)ᵀk_j: what is left depends on the "
         "query i only, and keeps the 1/√d of the logits", dense),
        ("the shift is constant along each row", "the same query i sees the same extra logit for every key j",
         rows_constant),
        ("softmax(S + shift) = softmax(S)", "softmax is unchanged when a constant is added to a row", softmax_cancels),
    ], learner=(fn,))


__all__ = ["check_count_biases", "check_biases_only", "check_key_bias_shift"]
