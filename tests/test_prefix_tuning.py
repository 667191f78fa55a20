"""Prefix tuning: same prefix in → same logits/loss/gradients as HF peft (Llama, GPT-2, both projection settings);
BERT against an explicit attention computation written here; generate against a greedy loop over peft's forward."""
import copy
import math

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

import minipeft as mp
from minipeft.additive import Prefix, PrefixTuningConfig, prefix_attention_mass

peft = pytest.importorskip("peft")
L = 3


def left_padded():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 64, (2, 7), generator=g)
    mask = torch.ones_like(x)
    mask[0, :3], x[0, :3] = 0, 0
    return x, mask


def with_peft(base, projection, task="CAUSAL_LM"):
    """Our adapter and peft's on copies of one base, with peft's tensors set to ours."""
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=L, prefix_projection=projection))
    model = mp.wrap(base, PrefixTuningConfig(num_virtual_tokens=L, prefix_projection=projection))
    mine, enc = model.input_adapters["default"], ref.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            enc.embedding.weight.copy_(mine.embedding)
            enc.transform.load_state_dict(mine.mlp.state_dict())
        else:
            enc.embedding.weight.copy_(mine.prefix)
    return model.train(), ref.train()  # dropout is 0 in the tiny models; train mode uses peft's MLP path


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forward_loss_and_gradients_match_peft(make, projection):
    model, ref = with_peft(make(), projection)
    x, mask = left_padded()
    labels = x.masked_fill(mask == 0, -100)
    a = model(input_ids=x, attention_mask=mask, labels=labels)
    b = ref(input_ids=x, attention_mask=mask, labels=labels)
    assert a.logits.shape == (2, 7, 64)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    a.loss.backward()
    b.loss.backward()
    mine = model.input_adapters["default"]
    enc = ref.prompt_encoder["default"]
    if projection:
        grads = [(mine.embedding.grad, enc.embedding.weight.grad),
                 (mine.mlp[2].weight.grad, enc.transform[2].weight.grad)]
    else:
        grads = [(mine.prefix.grad, enc.embedding.weight.grad)]
    for g_mine, g_ref in grads:
        assert g_mine.abs().max() > 0
        torch.testing.assert_close(g_mine, g_ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # no mask; explicit position_ids (both offset them by L_p)
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=0)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask, position_ids=pos).logits,
                                   ref(input_ids=x, attention_mask=mask, position_ids=pos).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_trainable_parameter_counts_match_peft_and_the_formula(projection):
    model, ref = with_peft(tiny_llama(), projection)
    cfg = model.base_model.config
    d = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)  # GQA: the key/value width (16)
    n = cfg.num_hidden_layers
    ours = model.trainable_summary()["trainable"]
    assert ours == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    want = L * d + (d * d + d) + (d * 2 * n * d + 2 * n * d) if projection else 2 * n * d * L
    assert ours == want
    assert model.adapter_state_dict()["input_adapter.prefix"].shape == (L, 2 * n * d)  # stored: 2·n·d·L_p


def greedy_reference(ref, x, mask, steps):
    """Greedy decoding by re-running peft's forward on the whole sequence each step (no cache), with the
    real tokens at positions 0, 1, ... counted over real tokens (peft adds L_p to position_ids)."""
    x, mask = x.clone(), mask.clone()
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = ref(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        x, mask = torch.cat([x, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return x


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_matches_a_greedy_loop_over_peft_forward_and_rows_alone(make, projection):
    model, ref = with_peft(make(), projection)
    model.eval(), ref.eval()
    x, mask = left_padded()
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = greedy_reference(ref, x, mask, 6)
        assert torch.equal(out, want)
        for row in range(2):  # a left-padded row generates what it generates alone
            real = x[row:row + 1, mask[row].bool()]
            alone = model.generate(input_ids=real, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(alone[:, -6:], out[row:row + 1, -6:])
        with model.disable_adapter():  # the prefix changes what is generated (the check above is not vacuous)
            plain = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


def bert_with_prefix_by_hand(bert, x, mask, prefix, L_p):
    """BERT's forward written out: each layer's self-attention attends to [P_k; K], [P_v; V] (prefix never masked);
    the input's positions start at L_p (the cache's length). Returns the classifier logits."""
    cfg = bert.config
    H, hd, n = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    P = prefix.view(L_p, n, 2, H, hd)
    emb = bert.bert.embeddings
    B, T = x.shape
    h = emb.word_embeddings(x) + emb.position_embeddings(torch.arange(L_p, L_p + T)) + \
        emb.token_type_embeddings(torch.zeros_like(x))
    h = emb.LayerNorm(h)
    keep = torch.cat([torch.ones(B, L_p), mask.float()], 1)  # (B, L_p + T)
    for i, layer in enumerate(bert.bert.encoder.layer):
        att = layer.attention.self
        heads = []
        for b in range(B):
            for j in range(H):
                s = slice(j * hd, (j + 1) * hd)
                q = h[b] @ att.query.weight[s].T + att.query.bias[s]  # (T, hd)
                k = torch.cat([P[:, i, 0, j], h[b] @ att.key.weight[s].T + att.key.bias[s]])  # (L_p + T, hd)
                v = torch.cat([P[:, i, 1, j], h[b] @ att.value.weight[s].T + att.value.bias[s]])
                scores = (q @ k.T / math.sqrt(hd)).masked_fill(keep[b] == 0, float("-inf"))
                heads.append(torch.softmax(scores, -1) @ v)
        ctx = torch.stack(heads).view(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
        out = layer.attention.output
        h = out.LayerNorm(out.dense(ctx) + h)
        inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
        h = layer.output.LayerNorm(layer.output.dense(inter) + h)
    pooled = torch.tanh(bert.bert.pooler.dense(h[:, 0]))
    return bert.classifier(pooled)


def test_bert_matches_an_explicit_computation():
    # peft refuses BERT ("Model does not support past key values"), so the reference is written here
    bert = tiny_bert()
    model = mp.wrap(copy.deepcopy(bert), PrefixTuningConfig(num_virtual_tokens=L))
    x, mask = left_padded()
    x, mask = x.flip(1), mask.flip(1)  # right padding, as BERT is used
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=mask).logits
        want = bert_with_prefix_by_hand(bert, x, mask, model.input_adapters["default"].prefix, L)
        plain = bert(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3
    loss = model.train()(input_ids=x, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert model.input_adapters["default"].prefix.grad.abs().max() > 0


def test_saved_adapter_holds_only_P_and_loads_as_P(tmp_path):
    model = mp.wrap(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=L, prefix_projection=True,
                                                     encoder_hidden_size=24))
    x, mask = left_padded()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask).logits
        P = model.input_adapters["default"].mlp(model.input_adapters["default"].embedding)
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert list(saved) == ["input_adapter.prefix"] and torch.equal(saved["input_adapter.prefix"], P)
    loaded = mp.load_adapter(tiny_llama(), tmp_path)
    cfg = loaded.peft_config["default"]
    assert cfg.prefix_projection is False and cfg.projection_folded is True and cfg.encoder_hidden_size == 24
    adapter = loaded.input_adapters["default"]
    assert isinstance(adapter, Prefix) and not hasattr(adapter, "mlp")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x, attention_mask=mask).logits, want)


def test_attention_mass_on_the_prefix_matches_layer_0_by_hand():
    # GPT-2, layer 0, zero prefix keys: each prefix slot scores 0,
    # so λ_i = L_p / (L_p + Σ_{j≤i} exp(q_i·k_j/√d_h))
    model = mp.wrap(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=L))
    x = left_padded()[0][1:]
    lam = prefix_attention_mass(model, x)
    assert lam.shape == (2,) and bool(((lam > 0) & (lam < 1)).all())
    with torch.no_grad():
        model.input_adapters["default"].prefix.zero_()
        lam = prefix_attention_mass(model, x)
        gpt = model.base_model.transformer
        h = gpt.h[0].ln_1(gpt.wte(x[0]) + gpt.wpe(torch.arange(L, L + x.shape[1])))
        q, k, _ = gpt.h[0].attn.c_attn(h).split(32, -1)
        want = []
        for j in range(4):  # heads of width 8
            s = (q[:, 8 * j:8 * j + 8] @ k[:, 8 * j:8 * j + 8].T / math.sqrt(8)).exp().tril()
            want.append(L / (L + s.sum(-1)))
    torch.testing.assert_close(lam[0], torch.stack(want).mean(), atol=1e-6, rtol=0)


def test_bad_input_raises_value_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prefix_projection"):
        PrefixTuningConfig(prefix_projection="yes")
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=-1)
    with pytest.raises(ValueError, match="projection_folded"):
        PrefixTuningConfig(prefix_projection=True, projection_folded=True)
    with pytest.raises(ValueError, match="target"):
        PrefixTuningConfig(target=["q_proj"])
    model = mp.wrap(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=L))
    x, _ = left_padded()
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=x, past_key_values=model.input_adapters["default"].make_cache(model.base_model, 2))
    with pytest.raises(ValueError, match="decoder-only"):
        mp.wrap(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=L)).generate(input_ids=x)
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="decoder-only models"):
        mp.wrap(t5, PrefixTuningConfig(num_virtual_tokens=L))
