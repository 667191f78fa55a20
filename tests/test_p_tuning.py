"""P-tuning: same encoder weights in → same logits/loss out as HF peft's PromptEncoderConfig (MLP and LSTM);
the encoder against explicit equations; parameter counts against the docstring's formula and peft's count."""
import copy

import pytest
import torch
from conftest import soft_prompt_greedy, tiny_bert, tiny_gpt2, tiny_llama

import minipeft as mp
from minipeft.additive import PTuningConfig, nearest_tokens, p_tuning_parameter_count, to_prompt_tuning

peft = pytest.importorskip("peft")
L = 5
D = 32  # hidden size of the tiny models


def batch(vocab=64):
    torch.manual_seed(1)
    x = torch.randint(3, vocab, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :3], x[0, :3] = 0, 0  # left padding in row 0
    return x, mask


def with_peft(base, encoder_type, task="CAUSAL_LM", h=None, n=2):
    """Our P-tuning adapter and peft's on copies of `base`, with our (random) weights copied into peft."""
    ref_cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=L, encoder_reparameterization_type=
                                       encoder_type.upper(), encoder_hidden_size=h, encoder_num_layers=n)
    ref = peft.get_peft_model(copy.deepcopy(base), ref_cfg)
    model = mp.wrap(base, PTuningConfig(num_virtual_tokens=L, encoder_type=encoder_type, encoder_hidden_size=h,
                                        encoder_num_layers=n))
    with torch.no_grad():  # perturb ours so that nothing matches by a shared init, then copy into peft
        for p in model.input_adapters["default"].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.prompt_encoder["default"].load_state_dict(model.input_adapters["default"].state_dict())  # strict
    return model.eval(), ref.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("encoder_type", ["mlp", "lstm"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_causal_lm_matches_peft(make, encoder_type):
    model, ref = with_peft(make(), encoder_type, n=2 if encoder_type == "mlp" else 1)
    x, mask = batch()
    labels = x.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = model(input_ids=x, attention_mask=mask, labels=labels)
        b = ref(input_ids=x, attention_mask=mask, labels=labels)
    assert a.logits.shape == b.logits.shape == (2, L + 7, 64)
    print(f"{make.__name__} {encoder_type}: max |logits - peft| = {max_diff(a.logits, b.logits):.2e}")
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    with torch.no_grad():
        a, b = model(input_ids=x), ref(input_ids=x)  # no mask, no labels
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder_type", ["mlp", "lstm"])
def test_bert_classification_matches_peft(encoder_type):
    model, ref = with_peft(tiny_bert(), encoder_type, task="SEQ_CLS", h=12)
    x, mask = batch()
    tt = torch.zeros_like(x)
    tt[:, 4:] = 1
    y = torch.tensor([0, 2])
    with torch.no_grad():
        a = model(input_ids=x, attention_mask=mask, token_type_ids=tt, labels=y)
        b = ref(input_ids=x, attention_mask=mask, token_type_ids=tt, labels=y)
    print(f"bert {encoder_type}: max |logits - peft| = {max_diff(a.logits, b.logits):.2e}")
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0) and abs(a.loss.item() - b.loss.item()) <= 1e-5


@pytest.mark.parametrize("encoder_type", ["mlp", "lstm"])
def test_gradients_match_peft(encoder_type):
    """One backward pass: the gradients of Z and of every encoder weight equal peft's."""
    model, ref = with_peft(tiny_llama(), encoder_type)
    x, mask = batch()
    labels = x.masked_fill(mask == 0, -100)
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    ours = dict(model.input_adapters["default"].named_parameters())
    theirs = dict(ref.prompt_encoder["default"].named_parameters())
    assert set(ours) == set(theirs)
    for k, p in ours.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
        torch.testing.assert_close(p.grad, theirs[k].grad, atol=1e-6, rtol=1e-4)


def test_mlp_encoder_by_hand():
    model = mp.wrap(tiny_llama(), PTuningConfig(num_virtual_tokens=L, encoder_hidden_size=16))
    enc = model.input_adapters["default"]
    Z = enc.embedding.weight
    (W1, b1), (W2, b2), (W3, b3) = [(enc.mlp_head[i].weight, enc.mlp_head[i].bias) for i in (0, 2, 4)]
    want = torch.relu(torch.relu(Z @ W1.T + b1) @ W2.T + b2) @ W3.T + b3
    assert torch.allclose(enc.virtual_tokens(), want, atol=1e-6)


def lstm_by_hand(Z, lstm, layer, reverse):
    """One direction of one LSTM layer, step by step (PyTorch's gate order i, f, g, o)."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    W_ih, W_hh = getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)
    b = getattr(lstm, "bias_ih" + sfx) + getattr(lstm, "bias_hh" + sfx)
    h = c = torch.zeros(lstm.hidden_size)
    out = [None] * len(Z)
    for t in (reversed(range(len(Z))) if reverse else range(len(Z))):
        i, f, g, o = (W_ih @ Z[t] + W_hh @ h + b).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out[t] = h
    return torch.stack(out)


def test_lstm_encoder_by_hand():
    model = mp.wrap(tiny_llama(), PTuningConfig(num_virtual_tokens=L, encoder_type="lstm", encoder_hidden_size=6))
    enc = model.input_adapters["default"]
    X = enc.embedding.weight
    for layer in range(2):  # two bidirectional layers: the second reads both directions of the first
        X = torch.cat([lstm_by_hand(X, enc.lstm_head, layer, False), lstm_by_hand(X, enc.lstm_head, layer, True)], -1)
    (W1, b1), (W2, b2) = [(enc.mlp_head[i].weight, enc.mlp_head[i].bias) for i in (0, 2)]
    want = torch.relu(X @ W1.T + b1) @ W2.T + b2
    assert torch.allclose(enc.virtual_tokens(), want, atol=1e-5)
    # the input is [P; E(x)] with P = f(Z)
    x, mask = batch()
    with torch.no_grad():
        embeds = torch.cat([want.expand(2, -1, -1), model.base_model.get_input_embeddings()(x)], 1)
        full = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], 1)
        expected = model.base_model(inputs_embeds=embeds, attention_mask=full).logits
        assert torch.allclose(model(input_ids=x, attention_mask=mask).logits, expected, atol=1e-5)


@pytest.mark.parametrize("encoder_type,h,n", [("mlp", None, 2), ("mlp", 7, 2), ("lstm", None, 1), ("lstm", 5, 2),
                                              ("lstm", 3, 3)])
def test_parameter_count_formula_and_peft(encoder_type, h, n):
    model, ref = with_peft(tiny_llama(), encoder_type, h=h, n=n)
    ours = model.trainable_summary()["trainable"]
    assert ours == p_tuning_parameter_count(D, L, encoder_type, h, n)
    assert ours == ref.get_nb_trainable_parameters()[0]
    hh = h or D
    if encoder_type == "mlp":  # the docstring's closed form
        assert ours == L * D + 2 * D * hh + hh * hh + 2 * hh + D


def test_disabled_is_base_and_only_the_encoder_trains():
    base = tiny_llama()
    x, mask = batch()
    with torch.no_grad():
        expected = base(input_ids=x, attention_mask=mask).logits
    model = mp.wrap(base, PTuningConfig(num_virtual_tokens=L, encoder_type="lstm"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"input_adapters.default.{n}" for n, _ in model.input_adapters["default"].named_parameters()}
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=x, attention_mask=mask).logits, expected)


def test_save_load_keeps_training_where_it_stopped(tmp_path):
    """The encoder is saved, so a reloaded adapter (is_trainable=True) takes the same next step bit for bit."""
    x, mask = batch()

    def step(m):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        opt.zero_grad()
        m(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        opt.step()
        with torch.no_grad():
            return m(input_ids=x, attention_mask=mask).logits

    model = mp.wrap(tiny_llama(), PTuningConfig(num_virtual_tokens=L, encoder_type="lstm"))
    step(model)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert torch.equal(step(loaded), step(model))


def test_to_prompt_tuning_is_peft_compact_form():
    model, ref = with_peft(tiny_gpt2(), "mlp")
    name = to_prompt_tuning(model)
    assert model.active_adapter == "default"
    x, mask = batch()
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask).logits
        model.set_adapter(name)
        assert torch.allclose(model(input_ids=x, attention_mask=mask).logits, want, atol=1e-6)
    saved = model.adapter_state_dict(name)
    assert sum(v.numel() for v in saved.values()) == L * D
    # peft saves exactly this tensor: its prompt_embeddings
    theirs = peft.get_peft_model_state_dict(ref)["prompt_embeddings"]
    assert torch.allclose(saved["input_adapter.prompt"], theirs, atol=1e-6)
    ids, _ = nearest_tokens(model, k=2, adapter_name="default")
    assert ids.shape == (L, 2) and torch.equal(ids, nearest_tokens(model, k=2, adapter_name=name)[0])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_left_padding(make):
    model = mp.wrap(make(), PTuningConfig(num_virtual_tokens=L, encoder_type="lstm")).eval()
    x, mask = batch()
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 7 + 6) and torch.equal(out[:, :7], x)
    with torch.no_grad():
        P = model.input_adapters["default"].virtual_tokens()
        assert torch.equal(out, soft_prompt_greedy(model.base_model, P, x, mask, 6))


@pytest.mark.parametrize("kwargs", [dict(num_virtual_tokens=0), dict(encoder_type="gru"), dict(encoder_type=3),
                                    dict(encoder_hidden_size=0), dict(encoder_hidden_size=2.5),
                                    dict(encoder_type="lstm", encoder_num_layers=0),
                                    dict(encoder_type="lstm", encoder_dropout=1.0),
                                    dict(encoder_num_layers=3), dict(encoder_dropout=0.1), dict(target=["q_proj"])])
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        PTuningConfig(**kwargs)


def test_peft_spelling_and_round_trip(tmp_path):
    cfg = PTuningConfig(encoder_type="LSTM", num_virtual_tokens=3)
    assert cfg.encoder_type == "lstm"
    model = mp.wrap(tiny_llama(), cfg)
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=batch()[0], position_ids=torch.arange(7)[None])
