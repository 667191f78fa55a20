"""Shared tiny models for the tests: random init from small configs (no downloads), hidden 32, 2 layers.

Each fixture builds a fresh model in eval mode with a fixed seed, so two calls give identical weights.
"""
import pytest
import torch
from safetensors.torch import load_file
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

VOCAB = 64


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def input_ids():
    """A batch of token ids (2, 10) that every tiny model accepts."""
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def train_losses(model, ids, steps: int, lr: float, weight_decay: float = 0.01) -> list[float]:
    """AdamW on the model's trainable tensors for `steps` steps of language modelling on `ids`; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def saved_selection(path) -> dict[str, torch.Tensor]:
    """{parameter name: flat indices} read back from adapter.safetensors."""
    out = {}
    for key, value in load_file(str(path / "adapter.safetensors")).items():
        if ".sparse_index." in key:
            owner, local = key.split(".sparse_index.")
            out[f"{owner}.{local.replace('__', '.')}"] = value
    return out


def soft_prompt_greedy(base, prompt, x, mask, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache) on [P; E(x)] for a soft prompt P (L_p, d), positions
    counted over the unpadded tokens: the reference for prompt tuning's and P-tuning's generate."""
    L = prompt.shape[-2]
    ids = x
    for _ in range(steps):
        full = torch.cat([torch.ones(len(x), L, dtype=mask.dtype), mask], 1)
        emb = torch.cat([prompt.expand(len(x), -1, -1), base.get_input_embeddings()(ids)], 1)
        logits = base(inputs_embeds=emb, attention_mask=full, position_ids=(full.cumsum(1) - 1).clamp(min=0)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids
