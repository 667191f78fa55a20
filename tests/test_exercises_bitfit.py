"""The BitFit exercise checks pass for correct solutions and fail for typical mistakes."""
import math

import torch
from torch import nn

from minipeft.exercises import check_biases_only, check_count_biases, check_key_bias_shift
from minipeft.selective import count_bias_parameters


def count_ok(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))


def count_linear_only(model):  # misses LayerNorm β and GPT-2's Conv1D
    return sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)


def count_all(model):  # counts every parameter
    return sum(p.numel() for p in model.parameters())


def test_count_biases():
    assert check_count_biases(count_ok)
    assert check_count_biases(count_bias_parameters)  # the package's own count agrees
    assert not check_count_biases(count_linear_only)
    assert not check_count_biases(count_all)


def mark_ok(model):
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))


def mark_nothing(model):
    pass


def mark_layernorm_too(model):  # LayerNorm γ is a weight, not a bias
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or "LayerNorm" in n)


def mark_head_too(model):  # the classifier head trained as well: not "biases only"
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("classifier"))


def test_biases_only():
    assert check_biases_only(mark_ok)
    for bad in (mark_nothing, mark_layernorm_too, mark_head_too):
        assert not check_biases_only(bad), bad.__name__


def shift_ok(Q, b_k):
    s = Q @ b_k / math.sqrt(Q.shape[-1])  # (T_q,)
    return s[:, None].expand(-1, 7)


def shift_per_key(Q, b_k):  # a common slip: the shift is taken to depend on the key
    return (torch.arange(7, dtype=Q.dtype)[None, :] * (Q @ b_k)[:, None]) / math.sqrt(Q.shape[-1])


def shift_unscaled(Q, b_k):  # forgot 1/√d
    return (Q @ b_k)[:, None].expand(-1, 7)


def test_key_bias_shift():
    assert check_key_bias_shift(shift_ok)
    assert not check_key_bias_shift(shift_per_key)
    assert not check_key_bias_shift(shift_unscaled)


# ---- second correct answers, more mistakes, and raising answers ------------------------------------------
def count_by_last_name(model):  # a second correct count
    total = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            total += p.numel()
    return total


def count_state_dict(model):  # counts a registered buffer named bias (old GPT-2's causal mask) as well
    return sum(t.numel() for n, t in model.state_dict().items() if n.endswith("bias"))


def test_count_biases_more():
    assert check_count_biases(count_by_last_name)
    report = check_count_biases(count_state_dict)
    assert [ok for _, ok in report] == [True, True, True, False]
    assert not any(ok for _, ok in check_count_biases(lambda m: 1 / 0))


def mark_freeze_then_unfreeze(model):  # a second correct answer
    model.requires_grad_(False)
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)


def test_biases_only_more(capsys):
    assert check_biases_only(mark_freeze_then_unfreeze)

    def raises(model):
        model.no_such_method()
    report = check_biases_only(raises)  # a FAIL with the error, not a traceback
    assert not any(ok for _, ok in report) and "AttributeError" in capsys.readouterr().out


def shift_outer(Q, b_k):  # a second correct answer: an outer product with a row of ones
    return torch.outer(Q @ b_k, torch.ones(7, dtype=Q.dtype)) / Q.shape[-1] ** 0.5


def shift_new_logits(Q, b_k):  # the new logits, not their change
    K = torch.zeros(7, Q.shape[-1], dtype=Q.dtype)
    return Q @ (K + b_k).T


def test_key_bias_shift_more():
    assert check_key_bias_shift(shift_outer)
    assert not check_key_bias_shift(shift_new_logits)
    assert not any(ok for _, ok in check_key_bias_shift(lambda Q, b: Q @ b @ b @ b))  # raises: shapes
