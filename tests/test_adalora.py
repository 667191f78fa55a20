"""AdaLoRA against HF peft's AdaLoraConfig (same tensors in: same logits, same regulariser, same importance
scores and surviving triplets out of RankAllocator.update_and_allocate, same budget schedule), plus the
schedule run by mp.Trainer and the save → load round trip with the learned ranks."""
import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama

import minipeft as mp
from minipeft.reparam.adalora import AdaLoRALinear, RankAllocator, adalora_layers, budget_schedule, rank_allocation

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402

TARGET = ["q_proj", "v_proj", "down_proj"]


def randomize(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for p in layer.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def twins(build=tiny_llama, target=TARGET, init_r=6, target_r=2, **kw):
    """Our model and peft's on two copies of one base, holding the same (random) adapter tensors."""
    ours = mp.wrap(build(), mp.AdaLoRAConfig(init_r=init_r, target_r=target_r, alpha=16, target=target, **kw))
    randomize(ours)
    # task_type: peft adds its regulariser to the loss only through PeftModelForCausalLM's forward
    peft_kw = {"total_step": 10, "orth_reg_weight": ours.peft_config["default"].orth_reg_weight, **kw}
    theirs = get_peft_model(build(), AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=16,
                                                    target_modules=target, task_type="CAUSAL_LM", **peft_kw))
    layers = adalora_layers(ours, "default")
    assert len(layers) == sum(isinstance(m, peft.tuners.adalora.SVDLinear) for m in theirs.modules())
    with torch.no_grad():
        for path, layer in layers:
            t = theirs.base_model.model.get_submodule(path)
            for attr in ("lora_A", "lora_B"):
                assert getattr(t, attr)["default"].shape == getattr(layer, attr)["default"].weight.shape
                getattr(t, attr)["default"].copy_(getattr(layer, attr)["default"].weight)
            t.lora_E["default"].copy_(layer.lora_E["default"])
    return ours, theirs


def batch(seed=1):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("build, target", [(tiny_llama, TARGET), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_same_tensors_same_logits_as_peft(build, target):
    ours, theirs = twins(build, target)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(**batch()).logits, theirs(**batch()).logits
    base = build()(**batch()).logits
    assert (a - base).abs().max() > 1e-3  # the adapter changes the output
    assert (a - b).abs().max() <= 1e-5
    ours.merge()  # merged ≡ unmerged
    with torch.no_grad():
        assert (ours(**batch()).logits - a).abs().max() <= 1e-5
    ours.unmerge()


def test_orthogonality_regulariser_equals_peft():
    ours, theirs = twins(orth_reg_weight=0.3)
    ours.train(), theirs.train()
    reg = ours.extra_loss()
    assert reg is not None and reg.item() > 0
    ours_loss = ours(**batch()).loss + reg
    theirs_loss = theirs(**batch()).loss  # peft adds γ·R to the loss inside its forward
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-5
    ours.peft_config["default"].orth_reg_weight = 0
    assert ours.extra_loss() is None


def test_init_lambda_zero_and_gaussian_P_Q():
    model = mp.wrap(tiny_llama(), mp.AdaLoRAConfig(init_r=12, target=["q_proj", "v_proj"]))
    for _, layer in model.adapter_layers():
        assert isinstance(layer, AdaLoRALinear)
        assert torch.equal(layer.lora_E["default"], torch.zeros(12, 1))
        for P in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert abs(P.std().item() - 0.02) < 0.005 and abs(P.mean().item()) < 0.005
    base = tiny_llama()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, base(**batch()).logits)
    d_in_out = sum(sum(layer.base_layer.weight.shape) for _, layer in model.adapter_layers())
    assert model.trainable_summary()["trainable"] == 12 * d_in_out + 12 * len(model.adapter_layers())


def test_budget_schedule_equals_peft():
    cfg = AdaLoraConfig(init_r=6, target_r=2, target_modules=TARGET, tinit=3, tfinal=4, deltaT=3, total_step=25)
    ref = PeftRankAllocator(get_peft_model(tiny_llama(), cfg).base_model.model, cfg, "default")
    for step in range(30):
        assert budget_schedule(step, 25, 3, 4, ref.init_bgt, ref.target_bgt, 3) == ref.budget_schedule(step), step


def test_importance_scores_and_surviving_triplets_equal_peft():
    T, tinit, tfinal = 8, 1, 2
    ours, theirs = twins(total_step=T, tinit=tinit, tfinal=tfinal, deltaT=2)
    ours.train(), theirs.train()
    alloc = ours.training_callbacks()[0]
    ref = theirs.base_model.rankallocator
    assert isinstance(alloc, RankAllocator)
    assert (alloc.init_budget, alloc.target_budget) == (ref.init_bgt, ref.target_bgt)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    key = "{}.{}.default"  # peft names the base model's parameters
    n_masks = 0
    for step in range(T):
        (ours(**batch(step)).loss + ours.extra_loss()).backward()
        theirs(**batch(step)).loss.backward()
        opt_o.step(), opt_t.step()
        alloc.update_and_allocate(step)
        theirs.base_model.update_and_allocate(step)
        if step < T - tfinal:  # the scores exist until the final allocation resets them
            scores = alloc.scores()
            for path in alloc.layers:
                for m, attr in (("A", "lora_A"), ("B", "lora_B"), ("E", "lora_E")):
                    for mine, theirs_ in ((alloc.exp_avg_ipt, ref.exp_avg_ipt), (alloc.exp_avg_unc, ref.exp_avg_unc)):
                        torch.testing.assert_close(mine[path, m], theirs_[key.format(path, attr)], rtol=1e-4, atol=1e-9)
                s = {attr: ref._element_score(key.format(path, attr)) for attr in ("lora_A", "lora_B", "lora_E")}
                peft_S = ref._combine_ipt(s["lora_E"], torch.cat([s["lora_A"].mean(dim=1, keepdim=True),
                                                                  s["lora_B"].mean(dim=0).view(-1, 1)], dim=1))
                torch.testing.assert_close(scores[path], peft_S, rtol=1e-4, atol=1e-12)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            n_masks += 1
            ours_pattern = ours.peft_config["default"].rank_pattern
            assert ours_pattern == {k.removeprefix("base_model.model.").removesuffix(".lora_E.default"): v
                                    for k, v in pattern.items()}
        for path, layer in alloc.layers.items():
            E_ref = theirs.base_model.model.get_submodule(path).lora_E["default"]
            torch.testing.assert_close(layer.lora_E["default"], E_ref, rtol=1e-4, atol=1e-7)
            assert torch.equal(layer.lora_E["default"] == 0, E_ref == 0)  # the same triplets are pruned
        opt_o.zero_grad(), opt_t.zero_grad()
    assert n_masks > 0
    assert sum(rank_allocation(ours).values()) == ref.target_bgt


def lm_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (8,), generator=g)), "labels": ids} for _ in range(n)]


def collate(exs):
    return {k: torch.stack([e[k] for e in exs]) for k in exs[0]}


class Recorder:
    def __init__(self):
        self.budgets, self.ranks = [], []

    def on_train_begin(self, trainer):
        self.alloc = next(cb for cb in trainer.callbacks if isinstance(cb, RankAllocator))

    def on_step_end(self, trainer):
        self.budgets.append(self.alloc.budget)
        self.ranks.append(sum(rank_allocation(trainer.model).values()))


@pytest.mark.parametrize("tinit, tfinal", [(2, 3), (0, 0)])
def test_trainer_runs_the_schedule(tinit, tfinal):
    steps, init_r, target_r = 12, 6, 2
    model = mp.wrap(tiny_llama(), mp.AdaLoRAConfig(init_r=init_r, target_r=target_r, target=TARGET,
                                                   tinit=tinit, tfinal=tfinal))
    rec = Recorder()
    mp.Trainer(model, lm_data(), collate_fn=collate, lr=1e-2, max_steps=steps, batch_size=8, callbacks=[rec],
               device="cpu", progress=False).train()
    n = len(model.adapter_layers())
    assert rec.alloc.total_step == steps  # from the Trainer: the config leaves it None
    assert rec.budgets[:tinit + 1] == [init_r * n] * (tinit + 1)  # warm-up: nothing pruned
    assert all(a >= b for a, b in zip(rec.budgets, rec.budgets[1:]))  # the budget only goes down
    assert rec.alloc.budget == target_r * n and rec.ranks[-1] == target_r * n
    ranks = rank_allocation(model)
    assert sum(ranks.values()) == target_r * n and len(set(ranks.values())) > 1  # unequal ranks: adaptive
    for path, keep in model.peft_config["default"].rank_pattern.items():
        E = model.base_model.get_submodule(path).lora_E["default"].view(-1)
        assert torch.all(E[~torch.tensor(keep)] == 0) and sum(keep) == ranks[path]


def test_save_load_round_trip_keeps_logits_and_ranks(tmp_path):
    model = mp.wrap(tiny_llama(), mp.AdaLoRAConfig(init_r=6, target_r=3, target=TARGET, tfinal=2))
    mp.Trainer(model, lm_data(), collate_fn=collate, lr=1e-2, max_steps=8, batch_size=8, device="cpu",
               progress=False).train()
    model.save_adapter(tmp_path)
    loaded = mp.load_adapter(tiny_llama(), tmp_path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, model(**batch()).logits)
    assert rank_allocation(loaded) == rank_allocation(model)
    assert loaded.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    # a fresh adapter built from the saved config starts with the pruned triplets at λ = 0
    fresh = mp.wrap(tiny_llama(), loaded.peft_config["default"])
    assert rank_allocation(fresh) == rank_allocation(model)


@pytest.mark.parametrize("kwargs, field", [
    (dict(init_r=0), "init_r"), (dict(target_r=0), "target_r"), (dict(init_r=4, target_r=8), "target_r"),
    (dict(tinit=-1), "tinit"), (dict(tfinal=1.5), "tfinal"), (dict(deltaT=0), "deltaT"),
    (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"), (dict(orth_reg_weight=-1), "orth_reg_weight"),
    (dict(total_step=0), "total_step"), (dict(total_step=10, tinit=5, tfinal=5), "total_step"),
    (dict(alpha=0), "alpha"), (dict(rank_pattern={"q_proj": 3}), "rank_pattern"),
])
def test_invalid_config_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        mp.AdaLoRAConfig(**kwargs)


def test_total_step_from_trainer_is_checked():
    model = mp.wrap(tiny_llama(), mp.AdaLoRAConfig(init_r=4, target_r=2, target=TARGET, tinit=3, tfinal=3))
    with pytest.raises(ValueError, match="^total_step"):
        mp.Trainer(model, lm_data(), collate_fn=collate, max_steps=5, batch_size=8, device="cpu",
                   progress=False).train()
