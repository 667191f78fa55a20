"""Tests for minipeft.quant: NF4 against the published table, quantization properties, Linear4bit,
quantize_model, PagedAdamW against torch.optim.AdamW, and GPU/bitsandbytes checks (skipped without CUDA)."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minipeft.quant import (CODES, Linear4bit, PagedAdamW, base_weight_bytes_per_param, bits_per_param,
                            dequantize_4bit, dequantize_4bit_reference, nf4_code_values, optimizer_state_bytes,
                            pack_4bit, quantize_4bit, quantize_model, roundtrip_mse, unpack_4bit)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# The NF4 code values as published by QLoRA / bitsandbytes (METHODS.md); a reference, not our output.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_code_matches_published_table():
    code = nf4_code_values()
    assert code.shape == (16,)
    torch.testing.assert_close(code.double(), torch.tensor(PUBLISHED_NF4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1


def test_fp4_e2m1_and_int4_codes():
    # OCP MX E2M1 magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, scaled by 1/6
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    torch.testing.assert_close(CODES["fp4"], torch.cat([-e2m1.flip(0)[:-1], e2m1]))
    torch.testing.assert_close(CODES["int4"], torch.arange(-7, 8) / 7)
    for code in CODES.values():
        assert code.numel() <= 16 and torch.all(code[1:] > code[:-1]) and code.abs().max() == 1


def test_pack_unpack_roundtrip_and_nibble_order():
    idx = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(0))
    packed = pack_4bit(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert torch.equal(unpack_4bit(packed).long(), idx)
    assert pack_4bit(torch.tensor([3, 10])).item() == 3 * 16 + 10  # first element in the high nibble
    with pytest.raises(ValueError):
        pack_4bit(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "fp4_bnb", "int4"])
def test_roundtrip_is_nearest_code_within_half_gap(quant_type):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(37, 101, generator=g)  # 3737 values: the last block is padded
    W[0, 0] = 9.0  # an outlier
    W[5, :] = 0.0  # all-zero stretch
    st = quantize_4bit(W, quant_type, double_quant=False)
    Wq = dequantize_4bit(st)
    code = CODES[quant_type]
    # per-element absmax of its block
    absmax = F.pad(W.reshape(-1), (0, (-W.numel()) % 64)).view(-1, 64).abs().amax(1)
    c = absmax.repeat_interleave(64)[: W.numel()].view_as(W)
    err = (W - Wq).abs()
    assert torch.all(err <= (code.diff().max() / 2) * c + 1e-6)
    # an independent nearest-code search (argmin over all codes) gives the same values
    normed = W / torch.where(c > 0, c, torch.ones_like(c))
    nearest = code[(normed[..., None] - code).abs().argmin(-1)] * c
    torch.testing.assert_close(Wq, nearest, atol=1e-6, rtol=0)


def test_double_quant_absmax_error_is_half_a_step():
    W = torch.randn(300, 1000, generator=torch.Generator().manual_seed(2))
    exact = quantize_4bit(W, double_quant=False).absmax
    st = quantize_4bit(W, double_quant=True)
    assert st.absmax.dtype == torch.int8 and st.absmax_scale.dtype == torch.float32
    torch.testing.assert_close(st.absmax_offset, exact.mean())
    step = (st.absmax_scale / 127).repeat_interleave(256)[: exact.numel()]
    assert torch.all((st.absmax_fp32() - exact).abs() <= step / 2 + 1e-6)
    rel = (dequantize_4bit(st) - W).pow(2).mean() / (dequantize_4bit(quantize_4bit(W, double_quant=False)) - W).pow(2).mean()
    assert rel < 1.01  # double quantization barely changes the error (the paper: no accuracy cost)


@pytest.mark.parametrize("shape", [(4096, 4096), (64, 64), (10, 7)])
def test_storage_equals_formula(shape):
    n = math.prod(shape)
    n_blocks = math.ceil(n / 64)
    st = quantize_4bit(torch.randn(shape), double_quant=True)
    assert st.nbytes == n_blocks * 32 + n_blocks * 1 + 4 * math.ceil(n_blocks / 256) + 4
    assert quantize_4bit(torch.randn(shape), double_quant=False).nbytes == n_blocks * 32 + n_blocks * 4
    if shape == (4096, 4096):
        assert abs(bits_per_param(st) - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-5  # paper: ≈ 4.127


def test_error_ordering_nf4_fp4_int4_on_normal_weights():
    W = torch.randn(512, 512, generator=torch.Generator().manual_seed(3))
    mse = {q: roundtrip_mse(W, q) for q in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < mse["fp4"] < mse["int4"], mse


def test_dtypes_shapes_and_bad_input():
    W = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    st = quantize_4bit(W)
    assert dequantize_4bit(st).dtype == torch.bfloat16 and dequantize_4bit(st).shape == W.shape
    assert dequantize_4bit(st, torch.float16).dtype == torch.float16
    with pytest.raises(ValueError):
        quantize_4bit(W, quant_type="nf3")
    with pytest.raises(ValueError):
        quantize_4bit(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        quantize_4bit(W.float(), blocksize=63)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward(compute_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    assert (q.in_features, q.out_features, q.weight_dtype) == (96, 40, torch.float32)
    assert list(q.parameters()) == [q.bias] and not q.bias.requires_grad
    W = q.dequantize()
    assert W.shape == (40, 96) and W.dtype == compute_dtype
    x = torch.randn(2, 5, 96)
    y = q(x)
    assert y.dtype == x.dtype
    ref = F.linear(x.to(compute_dtype), W, q.bias.to(compute_dtype)).float()
    torch.testing.assert_close(y, ref)
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < (0.1 if compute_dtype == torch.float32 else 0.12)


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_state_dict_roundtrip(tmp_path, double_quant):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(130, 24), torch.float32, double_quant=double_quant)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = Linear4bit(130, 24, bias=True, compute_dtype=torch.float32, double_quant=double_quant)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    for k, v in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(3, 130)
    assert torch.equal(fresh(x), q(x))


def test_set_weight_merge_and_requant_error():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 32), torch.float32, double_quant=False)
    W = q.dequantize()
    q.set_weight(W)  # a dequantized weight is a fixed point of quantization (no double quant)
    assert torch.equal(q.dequantize(), W)
    delta = 0.01 * torch.randn(32, 64)
    err = q.requant_error(W + delta)
    q.set_weight(W + delta)
    actual = (q.dequantize() - (W + delta)).abs().max().item()
    assert err["max_abs"] == pytest.approx(actual) and 0 < err["rel_fro"] < 0.15
    with pytest.raises(ValueError):
        q.set_weight(torch.randn(64, 32))


def test_quantize_model_gpt2_conv1d_and_skip():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        y0 = model(x).logits
    wte = model.transformer.wte.weight.clone()
    quantize_model(model, torch.float32, verbose=False)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 8  # 4 per block
    assert type(model.lm_head) is nn.Linear and torch.equal(model.transformer.wte.weight, wte)
    # the Conv1D's (in, out) weight arrives transposed
    err = (model.transformer.h[0].attn.c_attn.dequantize() - conv.weight.T).abs()
    assert err.max() <= conv.weight.abs().max() * CODES["nf4"].diff().max() / 2 + 1e-3
    with torch.no_grad():
        y1 = model(x).logits
    assert (y1 - y0).norm() / y0.norm() < 0.1
    assert 0.51 < base_weight_bytes_per_param(model) < 0.53  # ≈ 4.127 bits / 8
    assert model.quant_report["bytes_saved"] > 0


def test_quantize_model_skip_by_name():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.lm_head = nn.Embedding(10, 64), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 10)

    m = quantize_model(Tiny(), torch.float32, verbose=False)
    assert isinstance(m.body[0], Linear4bit) and type(m.lm_head) is nn.Linear and type(m.emb) is nn.Embedding
    m = quantize_model(Tiny(), torch.float32, skip=("lm_head", "body.0"), verbose=False)
    assert not any(isinstance(x, Linear4bit) for x in m.modules())


def test_paged_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    net2 = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    net2.load_state_dict(net.state_dict())
    opt = PagedAdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW(net2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(32, 8)
        for n, o in ((net, opt), (net2, ref)):
            o.zero_grad()
            n(x).pow(2).mean().backward()
            o.step()
    for p, p2 in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, p2, atol=1e-6, rtol=0)
    assert set(optimizer_state_bytes(opt)) == {"cpu"}
    with pytest.raises(ValueError):
        PagedAdamW(net.parameters(), lr=-1)


def test_compiled_dequant_matches_reference_cpu():
    # the torch.compile path (used on CUDA without Triton); slow-ish: one compilation, ~25 s on 2 cores
    from minipeft.quant import kernels
    from minipeft.quant.nf4 import get_code
    st = quantize_4bit(torch.randn(100, 99, generator=torch.Generator().manual_seed(4)))
    out = kernels.dequantize_4bit_compiled(st, get_code("nf4", pad16=True), torch.float32)
    assert kernels._compiled is not False, "torch.compile failed and fell back to eager"
    torch.testing.assert_close(out, dequantize_4bit_reference(st, torch.float32), atol=1e-6, rtol=1e-6)


@needs_cuda
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_dequant_matches_reference_cuda(double_quant, dtype):
    W = torch.randn(1000, 333, device="cuda")  # not a multiple of the block size
    st = quantize_4bit(W, double_quant=double_quant)
    fused = dequantize_4bit(st, dtype)  # on CUDA: the Triton kernel (or torch.compile)
    ref = dequantize_4bit_reference(st, dtype)
    assert fused.dtype == dtype and fused.shape == W.shape
    torch.testing.assert_close(fused, ref, rtol=1e-6 if dtype == torch.float32 else None,
                               atol=1e-6 if dtype == torch.float32 else None)
    cpu = dequantize_4bit_reference(quantize_4bit(W.cpu(), double_quant=double_quant), torch.float32)
    torch.testing.assert_close(fused.float().cpu(), cpu, rtol=1e-2, atol=1e-2)


@needs_cuda
def test_linear4bit_and_paged_adamw_on_cuda():
    lin = nn.Linear(256, 128).cuda()
    q = Linear4bit.from_linear(lin, torch.bfloat16)
    x = torch.randn(4, 256, device="cuda")
    torch.testing.assert_close(q(x), F.linear(x.bfloat16(), q.dequantize(), q.bias.bfloat16()).float())
    p = nn.Parameter(torch.randn(1000, device="cuda"))
    p2 = nn.Parameter(p.detach().clone())
    opt, ref = PagedAdamW([p], lr=1e-2), torch.optim.AdamW([p2], lr=1e-2)
    for _ in range(3):
        g = torch.randn(1000, device="cuda")
        p.grad, p2.grad = g.clone(), g.clone()
        opt.step(), ref.step()
    torch.testing.assert_close(p, p2, atol=1e-6, rtol=0)
    assert set(optimizer_state_bytes(opt)) == {"cpu"} and opt.state[p]["exp_avg"].is_pinned()


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf
    W = torch.randn(512, 384, device="cuda")
    packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
    torch.testing.assert_close(state.code.float().cpu(), nf4_code_values(), atol=1e-6, rtol=0)
    ours = quantize_4bit(W, "nf4", double_quant=False)
    torch.testing.assert_close(ours.absmax, state.absmax.float())
    same = (ours.packed == packed.reshape(-1)).float().mean().item()
    assert same > 0.999  # rare ties at midpoints may round differently
    diff = (dequantize_4bit(ours, torch.float32) - bnbf.dequantize_4bit(packed, state)).abs()
    assert (diff > 1e-5).float().mean() < 1e-3
