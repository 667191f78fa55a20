"""Serving several tasks from one base model: each request of a batch with its own task's adapter.

Without adapters, serving n fine-tuned tasks means n copies of the model and a batch per task. With
adapters the base is shared: load every task's adapter on one PeftModel and answer a batch of requests
for different tasks in one `generate`, request i with adapter adapter_names[i] ("__base__": the bare
base model). Every adapter layer calls its frozen base once for the whole batch and adds each adapter's
small change to its own rows (`AdapterLayer.mixed_forward`), so the answers are those each request would
get alone with its adapter active. Systems that serve thousands of LoRAs at once (S-LoRA, Punica, vLLM's
multi-LoRA) do the same with kernels that gather each row's A and B; this is the plain version.

    model = mp.load_adapter(base, "adapters/arithmetic", adapter_name="arithmetic")
    model.load_adapter("adapters/e2e", adapter_name="e2e")
    serve(model, ["Question: ... Answer:", "name[...] Text:"], ["arithmetic", "e2e"], tok)
"""
from __future__ import annotations

import torch

from .data import left_pad_prompts


@torch.no_grad()
def serve(model, prompts: list[str], adapter_names: list[str], tokenizer, max_new_tokens: int = 32,
          stop: str | None = "\n") -> list[str]:
    """Greedy continuations of `prompts`, prompt i answered by adapter adapter_names[i], all in one batch
    (left-padded, so every prompt's last token sits in the last column where generation starts). Each answer
    is cut at the first `stop` (None: kept whole). Puts the model in eval mode: serving is inference."""
    if len(prompts) != len(adapter_names):
        raise ValueError(f"serve: {len(prompts)} prompts but {len(adapter_names)} adapter_names (one per prompt)")
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in left_pad_prompts(tokenizer, prompts).items()}  # (B, T) each
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = model.generate(**batch, adapter_names=list(adapter_names), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.split(stop)[0] if stop else t for t in texts]


__all__ = ["serve"]
