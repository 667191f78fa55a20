"""BitFit and the sparse-delta machinery: same training as plain PyTorch on the biases, exact merge."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

import minipeft as mp
from minipeft.selective import BitFitConfig, SparseConfig, bias_changes, count_bias_parameters, delta_summary


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    hidden_dropout_prob=0, attention_probs_dropout_prob=0))


X = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 1])


def loss_of(model, bert_like):
    return model(X, labels=Y).loss if bert_like else model(X, labels=X).loss


@pytest.mark.parametrize("make", [gpt2, bert])
def test_count_init_and_grads(make):
    base = make()
    n_bias = sum(p.numel() for n, p in make().named_parameters() if n.endswith("bias"))  # from a fresh model
    with torch.no_grad():
        expected = base(X).logits
    model = mp.wrap(base, BitFitConfig())
    assert model.trainable_summary()["trainable"] == n_bias == count_bias_parameters(model)
    with torch.no_grad():
        assert torch.equal(model(X).logits, expected)  # δ = 0: exactly the base
    loss_of(model, make is bert).backward()
    for n, p in model.named_parameters():
        assert p.requires_grad == (".sparse_values.default." in n), n
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("make", [gpt2, bert])
def test_trains_like_plain_pytorch_on_biases(make):
    ref = make()
    model = mp.wrap(copy.deepcopy(ref), BitFitConfig())
    for n, p in ref.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        a, b = loss_of(ref, make is bert), loss_of(model, make is bert)
        assert abs(a.item() - b.item()) <= 1e-6
        losses.append(b.item())
        for o, loss in ((opt_ref, a), (opt, b)):
            o.zero_grad()
            loss.backward()
            o.step()
    assert losses[-1] < losses[0] - 1e-3  # it did train
    model.merge()
    trained = dict(ref.named_parameters())
    for n, p in model.base_model.named_parameters():
        if n.endswith("bias") and ".sparse_values." not in n:
            assert torch.allclose(p, trained[n.replace(".base_layer", "")], atol=1e-6)


def test_merge_is_exact_and_reversible():
    model = mp.wrap(bert(), BitFitConfig())
    before = {n: p.clone() for n, p in model.base_model.named_parameters() if ".sparse_" not in n}
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.normal_(std=0.1)
        unmerged = model(X).logits
        model.merge()
        assert torch.equal(model(X).logits, unmerged)
        model.unmerge()
        assert all(torch.equal(p, before[n]) for n, p in model.base_model.named_parameters() if n in before)


def test_llama_has_no_bias():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="no bias"):
        mp.wrap(llama, BitFitConfig())


def test_targets_and_bias_changes():
    model = mp.wrap(bert(), BitFitConfig(target=["query", "intermediate.dense"]))
    assert model.trainable_summary()["trainable"] == 2 * (32 + 64)
    loss_of(model, True).backward()
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p -= p.grad
    changes = bias_changes(model)
    assert set(changes) == {"bert.encoder.layer.*.attention.self.query", "bert.encoder.layer.*.intermediate.dense"}
    q = model.base_model.bert.encoder.layer[1].attention.self.query.sparse_values["default"]["bias"]
    assert changes["bert.encoder.layer.*.attention.self.query"][1] == q.abs().mean().item() > 0
    with pytest.raises(ValueError, match="without a bias"):
        mp.wrap(bert(), BitFitConfig(target=["attention.output"]))


def test_head_in_full_like_the_paper():
    model = mp.wrap(bert(), BitFitConfig(modules_to_save=["classifier"]))
    n_bias = sum(p.numel() for n, p in bert().named_parameters() if n.endswith("bias"))
    assert model.trainable_summary()["trainable"] == n_bias - 3 + (32 * 3 + 3)


def test_save_load_bit_exact_only_changed_entries(tmp_path):
    model = mp.wrap(gpt2(), BitFitConfig())
    with torch.no_grad():
        for _, p in model.adapter_parameters("default"):
            p.normal_()
        expected = model(X).logits
    model.save_adapter(tmp_path)
    state = model.adapter_state_dict()
    assert all(".sparse_values." in k or ".sparse_index." in k for k in state)
    assert sum(v.numel() for k, v in state.items() if ".sparse_values." in k) == count_bias_parameters(gpt2())
    loaded = mp.load_adapter(gpt2(), tmp_path)
    other = loaded.adapter_state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(X).logits, expected)


def test_two_adapters_switch_delete_disable():
    base = bert()
    with torch.no_grad():
        plain = base(X).logits
    model = mp.wrap(base, BitFitConfig())
    model.add_adapter("q", BitFitConfig(target=["query"]))
    model.set_adapter("q")
    with torch.no_grad():
        for name in ("default", "q"):
            for _, p in model.adapter_parameters(name):
                p.normal_(std=0.1)
        out_q = model(X).logits
        model.set_adapter("default")
        out_all = model(X).logits
        with model.disable_adapter():
            assert torch.equal(model(X).logits, plain)
    assert not torch.equal(out_q, out_all)
    model.delete_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(X).logits, out_q)
    model.delete_adapter("q")
    assert not model.adapter_layers()


def test_sparse_element_mask_matches_dense_edit(tmp_path):
    """Element-level selection (what FISH/PaFi pass): forward = the base with θ0 + δ written in by hand."""
    base = bert()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    mask = torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.1
    model = mp.wrap(copy.deepcopy(base), SparseConfig(selection={name: mask, "classifier.bias": [0, 2]}))
    assert model.trainable_summary()["trainable"] == int(mask.sum()) + 2
    delta = torch.randn(int(mask.sum()))
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.sparse_values["default"]["weight"].copy_(delta)
        base.get_parameter(name)[mask] += delta  # row-major order = flat index order
        assert torch.allclose(model(X).logits, base(X).logits, atol=1e-6)
    assert delta_summary(model)[name]["n"] == int(mask.sum())
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(bert(), tmp_path)
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("selection", [{}, {"nope.bias": [0]}, {"classifier.bias": [5]}, {"classifier.bias": [0, 0]},
                                       {"classifier.bias": torch.tensor([0.5])},
                                       {"classifier.bias": torch.ones(4, dtype=torch.bool)},
                                       {"classifier.bias": []}])
def test_invalid_selection(selection):
    with pytest.raises(ValueError):
        mp.wrap(bert(), SparseConfig(selection=selection))


def test_tied_weights_refused():
    with pytest.raises(ValueError, match="tied"):
        mp.wrap(gpt2(), SparseConfig(selection={"transformer.wte.weight": [0, 1]}))
