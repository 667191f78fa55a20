"""Prompt tuning: same prompt in → same logits/loss out as HF peft; generate vs a no-cache reference."""
import copy

import pytest
import torch
from conftest import soft_prompt_greedy
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import minipeft as mp
from minipeft.additive import PromptTuningConfig, nearest_tokens

peft = pytest.importorskip("peft")
L = 5


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    num_labels=3)).eval()


def left_padded():
    torch.manual_seed(1)
    x = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :3], x[0, :3] = 0, 0
    return x, mask


def with_peft(base, task="CAUSAL_LM"):
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=L))
    model = mp.wrap(base, PromptTuningConfig(num_virtual_tokens=L))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(model.input_adapters["default"].prompt)
    return model, ref


@pytest.mark.parametrize("make", [llama, gpt2])
def test_forward_matches_peft(make):
    model, ref = with_peft(make())
    x, mask = left_padded()
    labels = x.masked_fill(mask == 0, -100)
    a, b = model(input_ids=x, attention_mask=mask, labels=labels), ref(input_ids=x, attention_mask=mask, labels=labels)
    assert a.logits.shape == (2, L + 7, 100)
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    a, b = model(input_ids=x), ref(input_ids=x)  # no mask, no labels
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0)


def test_bert_classification_matches_peft():
    model, ref = with_peft(bert(), task="SEQ_CLS")
    x, mask = left_padded()
    tt = torch.zeros_like(x)
    tt[:, 4:] = 1
    y = torch.tensor([0, 2])
    a = model(input_ids=x, attention_mask=mask, token_type_ids=tt, labels=y)
    b = ref(input_ids=x, attention_mask=mask, token_type_ids=tt, labels=y)
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0) and abs(a.loss.item() - b.loss.item()) <= 1e-5


@pytest.mark.parametrize("make", [llama, gpt2])
def test_generate_left_padding(make):
    model, ref = with_peft(make())
    x, mask = left_padded()
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 7 + 6) and torch.equal(out[:, :7], x)
    with torch.no_grad():
        expected = soft_prompt_greedy(model.base_model, model.input_adapters["default"].prompt, x, mask, 6)
    assert torch.equal(out, expected)
    # the first new token's scores equal peft's. Only the prefill is compared: with transformers 5, peft's
    # later cached steps drift from its own forward (by 0.03-0.3 in logits). Only the unpadded row: peft counts
    # the pads as positions, HF's own generate (and we) skip them.
    rows = slice(1, 2)
    kw = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a = model.generate(input_ids=x[rows], attention_mask=mask[rows], **kw)
    b = ref.generate(input_ids=x[rows], attention_mask=mask[rows], **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.scores[0], b.scores[0], atol=1e-5, rtol=0)


def test_disabled_is_base_and_param_count():
    base = llama()
    x, mask = left_padded()
    with torch.no_grad():
        expected = base(input_ids=x, attention_mask=mask).logits
    model = mp.wrap(base, PromptTuningConfig(num_virtual_tokens=L))
    assert model.trainable_summary()["trainable"] == L * 32  # L_p · d
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["input_adapters.default.prompt"]
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=x, attention_mask=mask).logits, expected)
    out = model(input_ids=x, attention_mask=mask, labels=x)
    out.loss.backward()
    assert model.input_adapters["default"].prompt.grad.abs().sum() > 0


def test_inits():
    base = llama()
    E = base.get_input_embeddings().weight
    torch.manual_seed(0)
    m = mp.wrap(base, PromptTuningConfig(num_virtual_tokens=L))
    P = m.input_adapters["default"].prompt
    assert P.abs().max() <= 0.5 and P.std() > 0.2
    m.add_adapter("vocab", PromptTuningConfig(num_virtual_tokens=L, init="vocab"))
    m.set_adapter("vocab")
    ids, sims = nearest_tokens(m, k=3)
    assert torch.allclose(sims[:, 0], torch.ones(L)) and torch.equal(m.input_adapters["vocab"].prompt, E[ids[:, 0]])
    m.add_adapter("text", PromptTuningConfig(num_virtual_tokens=L, init="text", init_token_ids=[7, 8]))
    m.set_adapter("text")
    ids, _ = nearest_tokens(m, k=1)
    assert ids[:, 0].tolist() == [7, 8, 7, 8, 7]  # repeated, then cut to L_p


def test_from_text_with_a_real_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[UNK]", "classify", "the", "sentiment", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cfg = PromptTuningConfig.from_text(tokenizer, "classify the sentiment :", num_virtual_tokens=6)
    assert cfg.init_token_ids == [1, 2, 3, 4]
    model = mp.wrap(llama(), cfg)
    ids, _, strings = nearest_tokens(model, k=1, tokenizer=tokenizer)
    assert [s[0] for s in strings] == ["classify", "the", "sentiment", ":", "classify", "the"]
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(llama(), tmp_path)
    assert loaded.peft_config["default"].init_token_ids == [1, 2, 3, 4]


def test_save_load_bit_exact(tmp_path):
    model = mp.wrap(gpt2(), PromptTuningConfig(num_virtual_tokens=L))
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(gpt2(), tmp_path)
    assert torch.equal(loaded.input_adapters["default"].prompt, model.input_adapters["default"].prompt)
    assert not loaded.input_adapters["default"].prompt.requires_grad


def test_two_adapters_switch_delete():
    model = mp.wrap(gpt2(), PromptTuningConfig(num_virtual_tokens=L))
    model.add_adapter("long", PromptTuningConfig(num_virtual_tokens=3))
    model.set_adapter("long")
    x, _ = left_padded()
    assert model(input_ids=x).logits.shape[1] == 3 + 7
    model.set_adapter("default")
    assert model(input_ids=x).logits.shape[1] == L + 7
    assert model.trainable_summary()["trainable"] == L * 32
    model.delete_adapter("default")
    assert model.active_adapter == "long" and model(input_ids=x).logits.shape[1] == 3 + 7


@pytest.mark.parametrize("kwargs", [dict(num_virtual_tokens=0), dict(num_virtual_tokens=-2), dict(init="zeros"),
                                    dict(init="text"), dict(init="text", init_token_ids=[]),
                                    dict(init_token_ids=[1, 2]), dict(target=["q_proj"]), dict(init_range=0)])
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        PromptTuningConfig(**kwargs)


def test_bad_calls():
    model = mp.wrap(llama(), PromptTuningConfig(num_virtual_tokens=L))
    x, _ = left_padded()
    with pytest.raises(ValueError):
        model(input_ids=x, position_ids=torch.arange(7)[None])
    with pytest.raises(ValueError):
        model.merge()
    with pytest.raises(ValueError):
        mp.wrap(llama(), PromptTuningConfig(init="text", init_token_ids=[500]))
