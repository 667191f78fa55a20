"""Mixed-adapter batches: one forward (or generate) with a different adapter per row, `adapter_names=[...]`.

Checked against what nobody here wrote: each row run alone with its adapter set active (the model's own
single-adapter path, for every layer method of the contract), and HF peft's own `adapter_names` forward
with the same LoRA tensors. Plus the refusals (unknown name, wrong length, merged, input method, training).
"""
import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama
from test_contract import CASES, perturb

import minipeft as mp

ROUTE = ["one", "two", "__base__", "two", "one"]  # one name per row; "__base__": the bare base model

LAYER_CASES = {m: case for m, case in CASES.items() if case[1](0).kind == "layer"}
INPUT_METHODS = sorted(set(CASES) - set(LAYER_CASES))
EXTRA = {  # LoRA on an embedding and rsLoRA beside plain LoRA: (builder, config of "one", config of "two")
    "lora-embedding": (tiny_llama, mp.LoRAConfig(r=2, target=["embed_tokens", "q_proj"]),
                       mp.LoRAConfig(r=4, alpha=8, rslora=True, target=["embed_tokens", "down_proj"])),
    # the bottleneck adapter's own mixed_forward: one call of a whole attention sublayer (it takes the KV cache)
    "adapter-parallel-attention": (tiny_llama, mp.AdapterConfig(bottleneck=4, form="parallel", placement="attention"),
                                   mp.AdapterConfig(bottleneck=3, form="sequential", target=["self_attn"])),
    # BERT's output modules: the parallel adapter shifts the residual input_tensor, row by row
    "adapter-bert-residual": (tiny_bert, mp.AdapterConfig(bottleneck=4, form="parallel"),
                              mp.AdapterConfig(bottleneck=3, form="parallel", scale=2.0)),
    "lora-and-dora-on-other-modules": (tiny_llama, mp.LoRAConfig(r=2, target=["q_proj", "v_proj"]),
                                       mp.DoRAConfig(r=3, target=["gate_proj", "down_proj"])),
}


def two_adapters(build, config_a, config_b):
    """A model with adapters "one" and "two", both moved away from their init (so each row's result differs)."""
    model = mp.wrap(build(), config_a, "one")
    model.add_adapter("two", config_b)
    perturb(model, "one", 1)
    perturb(model, "two", 2)
    return model.eval()


def run_as(model, name, ids):
    """Logits of `ids` with adapter `name` set active ("__base__": inside disable_adapter)."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=ids).logits
        model.set_adapter(name)
        return model(input_ids=ids).logits


def each_row_alone(model, ids, route):
    """Row i run by itself (a batch of one) with adapter route[i] active — the definition of a mixed batch."""
    return torch.cat([run_as(model, name, ids[i:i + 1]) for i, name in enumerate(route)])


def each_row_in_same_batch(model, ids, route):
    """The whole batch run once per adapter, row i taken from adapter route[i]'s run: the same matmul shapes
    as the mixed call, so batch-size-dependent float rounding of the base (CPU kernels block differently for
    1 and 5 rows: 1.3e-6 on QLoRA's 4-bit base) is not mistaken for a routing error."""
    runs = {name: run_as(model, name, ids) for name in set(route)}
    return torch.stack([runs[name][i] for i, name in enumerate(route)])


def ids_for(n_rows, seed=3):
    return torch.randint(0, VOCAB, (n_rows, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", list(LAYER_CASES) + list(EXTRA))
def test_mixed_batch_equals_each_row_alone(method):
    if method in EXTRA:
        build, config_a, config_b = EXTRA[method]
    else:
        build, config, *_ = LAYER_CASES[method]
        config_a, config_b = config(0), config(1)
    model = two_adapters(build, config_a, config_b)
    ids = ids_for(len(ROUTE))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=ROUTE).logits
    alone, same = each_row_alone(model, ids, ROUTE), each_row_in_same_batch(model, ids, ROUTE)
    diff_same, diff_alone = (mixed - same).abs().max().item(), (mixed - alone).abs().max().item()
    print(f"{method}: max |mixed - same batch, one adapter| = {diff_same:.3g}, |mixed - row alone| = {diff_alone:.3g}")
    assert diff_same <= 1e-6
    assert diff_alone <= 1e-5
    with torch.no_grad():  # the rows really differ: a and b are not the base
        assert (alone[0] - alone[2]).abs().max() > 1e-4 and (alone[1] - alone[2]).abs().max() > 1e-4
    assert all(layer.row_adapters is None for _, layer in model.adapter_layers())  # routing reset after the call


def prompts_of_lengths(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def left_padded(prompts, pad=0):
    """(input_ids, attention_mask) with every prompt's last token in the last column."""
    T = max(len(p) for p in prompts)
    ids, mask = torch.full((len(prompts), T), pad), torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


def generate_as(model, name, ids, mask=None, **kw):
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, do_sample=False, **kw)
    model.set_adapter(name)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, do_sample=False, **kw)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_keeps_each_rows_adapter(num_beams):
    """Greedy and beam search with a KV cache, left padding: each prompt's tokens are those it gets alone
    (unpadded) with its adapter, and each step's logits those of the same padded batch run with that adapter."""
    model = two_adapters(tiny_llama, mp.LoRAConfig(r=4, target=["q_proj", "v_proj", "o_proj"]),
                         mp.DoRAConfig(r=2, target=["gate_proj", "down_proj"]))
    route = ["one", "__base__", "two", "one"]
    prompts = prompts_of_lengths([5, 7, 3, 6])
    ids, mask = left_padded(prompts)
    kw = dict(max_new_tokens=6, num_beams=num_beams)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=route, pad_token_id=0,
                           do_sample=False, **kw)
    for i, (name, p) in enumerate(zip(route, prompts)):
        alone = generate_as(model, name, p[None], **kw)
        assert torch.equal(mixed[i, ids.shape[1]:], alone[0, len(p):]), f"row {i} ({name})"
    if num_beams == 1:
        kw.update(return_dict_in_generate=True, output_logits=True)
        steps = model.generate(input_ids=ids, attention_mask=mask, adapter_names=route, pad_token_id=0,
                               do_sample=False, **kw).logits
        for i, name in enumerate(route):
            ref = generate_as(model, name, ids, mask, **kw).logits
            diff = max((s[i] - r[i]).abs().max().item() for s, r in zip(steps, ref))
            print(f"generate row {i} ({name}): max |step logits - same batch with its adapter| = {diff:.3g}")
            assert diff <= 1e-6


def test_same_logits_and_tokens_as_peft():
    """peft's own mixed batch (`adapter_names`, LoRA and rsLoRA adapters, a "__base__" row) on the same
    tensors gives the same logits and the same greedy tokens."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    ours = mp.wrap(tiny_llama(), mp.LoRAConfig(r=4, alpha=8, target=["q_proj", "v_proj"]), "one")
    ours.add_adapter("two", mp.LoRAConfig(r=2, alpha=4, rslora=True, target=["q_proj", "k_proj", "down_proj"]))
    perturb(ours, "one", 1)
    perturb(ours, "two", 2)
    ours.eval()
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                            adapter_name="one")
    theirs.add_adapter("two", LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                       target_modules=["q_proj", "k_proj", "down_proj"]))
    for name in ("one", "two"):
        state = {"base_model.model." + k: v for k, v in ours.adapter_state_dict(name).items()}
        assert not set_peft_model_state_dict(theirs, state, adapter_name=name).unexpected_keys
    theirs.eval()
    ids = ids_for(len(ROUTE))
    with torch.no_grad():
        diff = (ours(input_ids=ids, adapter_names=ROUTE).logits
                - theirs(input_ids=ids, adapter_names=ROUTE).logits).abs().max().item()
    print(f"max |ours - peft| mixed-batch logits = {diff:.3g}")
    assert diff <= 1e-5
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=ids, adapter_names=ROUTE, **kw),
                       theirs.generate(input_ids=ids, adapter_names=ROUTE, **kw))


@pytest.fixture
def lora_pair():
    return two_adapters(tiny_llama, mp.LoRAConfig(r=2, target=["q_proj"]), mp.LoRAConfig(r=3, target=["v_proj"]))


@pytest.mark.parametrize("names, message", [
    (["one", "c", "one", "two", "one"], r"no adapter named \['c'\]; adapters: \['one', 'two'\]"),
    (["one", "two"], "adapter_names has 2 names but the batch has 5 rows"),
    ("one", "must be a list of adapter names"),
])
def test_bad_adapter_names(lora_pair, names, message):
    with pytest.raises(ValueError, match=message):
        lora_pair(input_ids=ids_for(5), adapter_names=names)
    with pytest.raises(ValueError, match=message):
        lora_pair.generate(input_ids=ids_for(5), adapter_names=names, max_new_tokens=2)


def test_refusals(lora_pair):
    ids = ids_for(2)
    lora_pair.merge("one")
    with pytest.raises(ValueError, match="merged; call unmerge"):
        lora_pair(input_ids=ids, adapter_names=["one", "two"])
    lora_pair.unmerge()
    lora_pair.train()
    with pytest.raises(ValueError, match="model.eval"):
        lora_pair(input_ids=ids, adapter_names=["one", "two"])
    lora_pair.eval()
    with lora_pair.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        lora_pair(input_ids=ids, adapter_names=["one", "two"])


@pytest.mark.parametrize("method", INPUT_METHODS)
def test_input_methods_are_refused(lora_pair, method):
    """Prompt/prefix/P-tuning change the sequence (or the KV cache) of the whole batch, not a layer's rows."""
    lora_pair.add_adapter("soft", CASES[method][1](0))
    with pytest.raises(ValueError, match=f"{method}.*changes the input sequence"):
        lora_pair(input_ids=ids_for(2), adapter_names=["one", "soft"])


def test_routing_is_cleared_when_the_call_fails(lora_pair):
    bad = torch.full((2, 4), VOCAB + 5)  # out of the vocabulary: the embedding raises inside the routed call
    with pytest.raises(IndexError):
        lora_pair(input_ids=bad, adapter_names=["one", "two"])
    assert all(layer.row_adapters is None for _, layer in lora_pair.adapter_layers())
    ids = ids_for(2)
    with torch.no_grad():  # and the model runs its active adapter again, on every row
        torch.testing.assert_close(lora_pair(input_ids=ids).logits, run_as(lora_pair, "one", ids), rtol=0, atol=0)


def test_serve_answers_each_prompt_with_its_adapter():
    """minipeft.serving.serve (one left-padded batch, mixed adapters) gives each prompt the greedy answer it
    gets alone, through the course's evaluation path with its adapter set active."""
    from minipeft.evaluate import generate
    from minipeft.serving import serve
    base, tok = mp.zoo.load("tiny-llama")
    model = two_adapters(lambda: base, mp.LoRAConfig(r=4, target="all-linear"),
                         mp.LoRAConfig(r=2, target=["q_proj", "v_proj"]))
    prompts = [ex["prompt"] for ex in mp.data.load("arithmetic", "test", n=2) + mp.data.load("e2e", "test", n=2)]
    route = ["one", "two", "__base__", "two"]
    served = serve(model, prompts, route, tok, max_new_tokens=8)
    for prompt, name, answer in zip(prompts, route, served):
        if name == "__base__":
            with model.disable_adapter():
                assert generate(model, tok, [prompt], max_new_tokens=8) == [answer]
        else:
            model.set_adapter(name)
            assert generate(model, tok, [prompt], max_new_tokens=8) == [answer]
    assert serve(model, prompts, ["__base__"] * 4, tok, max_new_tokens=8) != served  # the adapters do answer
    with pytest.raises(ValueError, match="3 prompts but 2 adapter_names"):
        serve(model, prompts[:3], route[:2], tok)
