"""The scaling-out chapter's exercise checks: each passes several different correct answers and fails
typical mistakes on the right line (loss weights: all ones, n_r / Σn without the N, relative to the largest
slice, inverted, the wrong length; mixed LoRA: the first adapter for every row, rows regrouped but not put
back, no scale, "__base__" rows with an adapter, every adapter summed; bytes per rank: the base sharded under
DDP, not sharded under FSDP, AdamW with one moment, the adapter at 2 bytes, the adapter sharded under FSDP).
A solution that raises gives FAIL lines, never a traceback; an untouched stub is "not attempted yet".

The correct answers are written independently of minipeft (plain Python, numpy and tensors).
"""
import math

import numpy as np
import pytest
import torch

from minipeft.exercises import check_loss_weights, check_mixed_lora, check_per_rank_bytes


def failing(report):
    return [i for i, (_, ok) in enumerate(report) if not ok]


# -- exercise 1: loss weights ----------------------------------------------------------------------------
def weights_list(n_items):
    total = sum(n_items)
    return [len(n_items) * n / total for n in n_items]


def weights_numpy(n_items):  # a second correct answer: n_r over the mean slice, as a numpy array
    n = np.asarray(n_items, dtype=np.float64)
    return n / n.mean()


def weights_tensor(n_items):  # a third: a float32 tensor
    n = torch.tensor(n_items, dtype=torch.float32)
    return n * len(n) / n.sum()


def weights_all_ones(n_items):  # plain DDP averaging
    return [1.0] * len(n_items)


def weights_forgot_n(n_items):
    return [n / sum(n_items) for n in n_items]


def weights_over_max(n_items):
    return [n / max(n_items) for n in n_items]


def weights_inverted(n_items):
    mean = sum(n_items) / len(n_items)
    return [mean / n for n in n_items]


def weights_one_short(n_items):  # the last rank forgotten
    return weights_list(n_items)[:-1]


@pytest.mark.parametrize("fn", [weights_list, weights_numpy, weights_tensor])
def test_loss_weights_correct_passes(fn):
    assert check_loss_weights(fn)


@pytest.mark.parametrize("fn, fails", [
    (weights_all_ones, [3]),
    (weights_forgot_n, [1, 2, 3]),
    (weights_over_max, [2, 3]),
    (weights_inverted, [2, 3]),
    (weights_one_short, [0, 1, 2, 3]),
])
def test_loss_weights_broken_fails(fn, fails):
    report = check_loss_weights(fn)
    assert not report and failing(report) == fails


def test_loss_weights_messages_and_raising(capsys):
    check_loss_weights(weights_one_short)
    assert "returned 4 weights, expected 5 (one per rank)" in capsys.readouterr().out
    report = check_loss_weights(lambda n_items: [k / 0 for k in n_items])  # ZeroDivisionError on every line
    assert not report and failing(report) == [0, 1, 2, 3]
    assert "ZeroDivisionError" in capsys.readouterr().out


# -- exercise 2: one batch, several LoRA adapters --------------------------------------------------------
def mixed_by_group(x, W0, adapters, names, scale):
    out = x @ W0.T
    for name in set(names) - {"__base__"}:
        rows = [i for i, t in enumerate(names) if t == name]
        A, B = adapters[name]
        out[rows] += scale * (x[rows] @ A.T) @ B.T
    return out


def mixed_gathered(x, W0, adapters, names, scale):  # a second correct answer: gather each row's A and B
    keys = list(adapters)
    r, d_out = adapters[keys[0]][0].shape[0], W0.shape[0]
    A = torch.stack([adapters[t][0] if t != "__base__" else torch.zeros_like(adapters[keys[0]][0])
                     for t in names])
    B = torch.stack([adapters[t][1] if t != "__base__" else torch.zeros(d_out, r) for t in names])
    low = torch.einsum("bri,bi->br", A, x)
    return x @ W0.T + scale * torch.einsum("bor,br->bo", B, low)


def mixed_float64_loop(x, W0, adapters, names, scale):  # a third: row by row in float64
    rows = []
    for xi, t in zip(x.double(), names):
        h = W0.double() @ xi
        if t in adapters:
            A, B = adapters[t]
            h = h + scale * B.double() @ (A.double() @ xi)
        rows.append(h)
    return torch.stack(rows)


def mixed_first_adapter(x, W0, adapters, names, scale):
    A, B = next(iter(adapters.values()))
    return x @ W0.T + scale * (x @ A.T) @ B.T


def mixed_not_put_back(x, W0, adapters, names, scale):  # groups concatenated in sorted order
    parts = []
    for name in sorted(set(names)):
        rows = [i for i, t in enumerate(names) if t == name]
        h = x[rows] @ W0.T
        if name != "__base__":
            A, B = adapters[name]
            h = h + scale * (x[rows] @ A.T) @ B.T
        parts.append(h)
    return torch.cat(parts)


def mixed_no_scale(x, W0, adapters, names, scale):
    return mixed_by_group(x, W0, adapters, names, 1.0)


def mixed_base_gets_adapter(x, W0, adapters, names, scale):  # "__base__" falls back to the first adapter
    first = next(iter(adapters))
    return mixed_by_group(x, W0, adapters, [t if t in adapters else first for t in names], scale)


def mixed_sum_all(x, W0, adapters, names, scale):
    return x @ W0.T + scale * sum((x @ A.T) @ B.T for A, B in adapters.values())


@pytest.mark.parametrize("fn", [mixed_by_group, mixed_gathered, mixed_float64_loop])
def test_mixed_lora_correct_passes(fn):
    assert check_mixed_lora(fn)


@pytest.mark.parametrize("fn, fails", [
    (mixed_first_adapter, [1, 2, 3]),
    (mixed_not_put_back, [2]),
    (mixed_no_scale, [0, 1, 2, 3]),
    (mixed_base_gets_adapter, [3]),
    (mixed_sum_all, [1, 2, 3]),
])
def test_mixed_lora_broken_fails(fn, fails):
    report = check_mixed_lora(fn)
    assert not report and failing(report) == fails


def test_mixed_lora_shape_and_raising(capsys):
    check_mixed_lora(lambda x, W0, adapters, names, scale: mixed_by_group(x, W0, adapters, names, scale).T)
    assert "expected (B, d_out) = (3, 5)" in capsys.readouterr().out
    report = check_mixed_lora(lambda x, W0, adapters, names, scale: x @ W0)  # (B, d_in) @ (d_out, d_in)
    assert not report and failing(report) == [0, 1, 2, 3]
    assert "RuntimeError" in capsys.readouterr().out


# -- exercise 3: bytes per rank under DDP and FSDP ---------------------------------------------------------
def bytes_terms(base_params, adapter_params, world_size, strategy):
    base = 2 * base_params
    if strategy == "fsdp":
        base = math.ceil(base_params / world_size) * 2
    weight, grad, adam = 4 * adapter_params, 4 * adapter_params, 8 * adapter_params
    return base + weight + grad + adam


def bytes_table(base_params, adapter_params, world_size, strategy):  # a second: shares per strategy
    shard = {"ddp": 1.0, "fsdp": 1.0 / world_size}[strategy]
    return 2.0 * base_params * shard + 16.0 * adapter_params


def bytes_base_sharded_in_ddp(base_params, adapter_params, world_size, strategy):
    return 2 * base_params / world_size + 16 * adapter_params


def bytes_fsdp_not_sharded(base_params, adapter_params, world_size, strategy):
    return 2 * base_params + 16 * adapter_params


def bytes_adam_one_moment(base_params, adapter_params, world_size, strategy):
    return bytes_table(base_params, 0, world_size, strategy) + 12 * adapter_params


def bytes_adapter_bf16(base_params, adapter_params, world_size, strategy):
    return bytes_table(base_params, 0, world_size, strategy) + 2 * adapter_params


def bytes_zero3(base_params, adapter_params, world_size, strategy):  # the adapter sharded too under FSDP
    if strategy == "fsdp":
        return (2 * base_params + 16 * adapter_params) / world_size
    return bytes_table(base_params, adapter_params, world_size, strategy)


@pytest.mark.parametrize("fn", [bytes_terms, bytes_table])
def test_per_rank_bytes_correct_passes(fn):
    assert check_per_rank_bytes(fn)


@pytest.mark.parametrize("fn, fails", [
    (bytes_base_sharded_in_ddp, [2]),
    (bytes_fsdp_not_sharded, [3, 4]),
    (bytes_adam_one_moment, [1, 2, 4]),
    (bytes_adapter_bf16, [1, 2, 4]),
    (bytes_zero3, [4]),
])
def test_per_rank_bytes_broken_fails(fn, fails):
    report = check_per_rank_bytes(fn)
    assert not report and failing(report) == fails


def test_per_rank_bytes_messages_and_raising(capsys):
    check_per_rank_bytes(bytes_zero3)
    assert "4 rank(s), fsdp: 3,327,680 bytes, expected 4,310,720" in capsys.readouterr().out
    report = check_per_rank_bytes(lambda base, adapter, world, strategy: {"ddp": 1}[strategy] * 2 * base)
    assert not report and failing(report) == [1, 2, 3, 4]  # no adapter term, then a KeyError under fsdp
    assert "KeyError" in capsys.readouterr().out


def test_unstarted_stubs_are_invitations(capsys):
    def stub(*args):
        raise NotImplementedError("your code here")

    for check in (check_loss_weights, check_mixed_lora, check_per_rank_bytes):
        report = check(stub)
        assert not report and not report.attempted
        assert "not attempted yet" in capsys.readouterr().out
