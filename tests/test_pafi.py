"""PaFi against references nobody here wrote: the k smallest (or largest) |θ0| by an explicit torch.sort over
every eligible parameter, the head and tied weights left out, and the saved file's size against a dense one."""
import json

import pytest
import torch
from conftest import saved_selection, tiny_bert, tiny_gpt2
from safetensors.torch import load_file, save_file

import minipeft as mp
from minipeft.selective import PaFiConfig


def distinct_values(model, seed=0):
    """Add small seeded noise to every parameter: a fresh model has many exact ties (zero biases, LayerNorm
    weights of 1), which would make "the k smallest" depend on how ties are broken."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return model


def reference_top_k(params: dict, k: int, smallest: bool) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} of the k smallest (largest) |θ| over all `params`, by torch.sort."""
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    ordered = torch.sort(flat, descending=not smallest)
    assert ordered.values[k - 1] != ordered.values[k]  # no tie at the threshold: the answer is unique
    top = ordered.indices[:k]
    out, start = {}, 0
    for name, p in params.items():
        mine = top[(top >= start) & (top < start + p.numel())] - start
        if mine.numel():
            out[name] = mine.sort().values
        start += p.numel()
    return out


def untied_parameters(model, skip=()) -> dict:
    """Parameters owned by one module only (named_parameters(remove_duplicate=False) lists a tied tensor
    under every name it has), less those whose name starts with one of `skip`."""
    names_of, tensors = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    return {names[0]: tensors[key] for key, names in names_of.items()
            if len(names) == 1 and not names[0].startswith(tuple(skip))}


def assert_same_selection(got: dict, want: dict):
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("magnitude", ["smallest", "largest"])
def test_mask_is_the_k_extreme_magnitudes_and_skips_the_head(magnitude, tmp_path):
    def base():
        model = distinct_values(tiny_bert())
        with torch.no_grad():  # make the head the most extreme: if it were scored, it would be chosen
            model.classifier.weight.mul_(1e-4 if magnitude == "smallest" else 1e3)
        return model

    density = 0.01
    model = mp.wrap(base(), PaFiConfig(density=density, magnitude=magnitude, modules_to_save=["classifier"]))
    model.save_adapter(tmp_path)
    eligible = untied_parameters(base(), skip=["classifier."])
    k = int(density * sum(p.numel() for p in eligible.values()))
    assert_same_selection(saved_selection(tmp_path), reference_top_k(eligible, k, magnitude == "smallest"))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert meta["magnitude"] == magnitude and sum(meta["selection"].values()) == k

    # without modules_to_save the head is scored and wins: leaving it out above was not a no-op
    scored_head = mp.wrap(base(), PaFiConfig(density=density, magnitude=magnitude))
    scored_head.save_adapter(tmp_path / "with_head")
    assert "classifier.weight" in saved_selection(tmp_path / "with_head")


def test_tied_weights_are_not_chosen(tmp_path):
    def base():
        model = distinct_values(tiny_gpt2())
        assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its head to the embeddings
        with torch.no_grad():  # the smallest weights of all: they would be chosen if they were eligible
            model.transformer.wte.weight.mul_(1e-3)
        return model

    density = 0.02
    model = mp.wrap(base(), PaFiConfig(density=density))
    model.save_adapter(tmp_path)
    eligible = untied_parameters(base())
    assert "transformer.wte.weight" not in eligible and "lm_head.weight" not in eligible
    k = int(density * sum(p.numel() for p in eligible.values()))
    assert k < base().transformer.wte.weight.numel()  # so wte alone could have filled the budget
    assert_same_selection(saved_selection(tmp_path), reference_top_k(eligible, k, smallest=True))


def test_invalid_magnitude():
    with pytest.raises(ValueError, match="magnitude"):
        PaFiConfig(density=0.01, magnitude="median")


def test_saved_file_is_far_smaller_than_a_dense_checkpoint(tmp_path):
    density = 0.01
    base = distinct_values(tiny_bert(hidden=64))
    eligible = untied_parameters(base)
    n, k = sum(p.numel() for p in eligible.values()), int(density * sum(p.numel() for p in eligible.values()))
    model = mp.wrap(base, PaFiConfig(density=density))
    model.save_adapter(tmp_path)
    save_file({name: p.detach().contiguous() for name, p in eligible.items()}, str(tmp_path / "dense.safetensors"))
    sparse_size = (tmp_path / "adapter.safetensors").stat().st_size
    dense_size = (tmp_path / "dense.safetensors").stat().st_size

    # the tensors: k int64 indices and k float32 values, against n float32 entries
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == k * (8 + 4)
    ideal_ratio = k * (8 + 4) / (n * 4)
    print(f"PaFi adapter file {sparse_size:,} B, dense {dense_size:,} B: {sparse_size / dense_size:.3f} "
          f"(tensors alone {ideal_ratio:.3f})")
    assert sparse_size < 2 * ideal_ratio * dense_size  # headers included, within twice the tensors' ratio
