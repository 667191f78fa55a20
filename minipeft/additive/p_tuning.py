r"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385), in peft's form.

The virtual tokens are not trained directly, as in prompt tuning: a small network, the prompt encoder f,
produces them from trainable input embeddings Z, and Z and f train together:

    P = f(Z),   Z ∈ R^{L_p×d} (`embedding.weight`, init N(0, 1) as nn.Embedding),   X' = [P; E(x)]

    MLP  (encoder_type="mlp"):   f(Z) = W_3 ReLU(W_2 ReLU(W_1 Z + b_1) + b_2) + b_3
                                 W_1: d→h, W_2: h→h, W_3: h→d (`mlp_head` 0, 2, 4)
    LSTM (encoder_type="lstm"):  H = BiLSTM(Z) ∈ R^{L_p×2h} (n layers, `lstm_head`),
                                 f(Z) = W_2 ReLU(W_1 H + b_1) + b_2,  W_1: 2h→2h, W_2: 2h→d (`mlp_head` 0, 2)

h = `encoder_hidden_size` (default d, as peft), n = `encoder_num_layers` (LSTM only; peft ignores it for
the MLP with a warning, we reject a value other than 2), `encoder_dropout` between LSTM layers (n > 1).
Everything after P is prompt tuning's (`PrependedPrompt`): P goes in front of the embedded input, the mask
gets L_p ones, causal-LM labels L_p entries of -100, BERT's token_type_ids L_p zeros, positions count over
[P; x]. Names follow peft's `PromptEncoder` (embedding, mlp_head, lstm_head), so its weights copy over.

Init: Z ~ N(0, 1) (nn.Embedding's default) and PyTorch's default init of nn.Linear / nn.LSTM, as peft. Merging:
nothing to merge (the adapter changes the input, not a weight), as prompt tuning. `nearest_tokens` reads f(Z).

Trainable parameters (d = hidden size, h = encoder_hidden_size, n = encoder_num_layers):

    MLP:   L_p·d + (d·h + h) + (h·h + h) + (h·d + d)                          = L_p·d + 2dh + h² + 2h + d
    LSTM:  L_p·d + 2·[4h(d + h) + 8h] + (n−1)·2·[4h(2h + h) + 8h]          (BiLSTM: per direction and layer
           + (2h·2h + 2h) + (2h·d + d)                                       4h(input + h) weights, 8h biases)

Where this differs from the paper:
- Placement. The paper places virtual tokens *inside a template* mixed with the input and with discrete
  tokens, e.g. [P_0..P_i] x [P_{i+1}..P_m] y, and keeps task-related *anchor tokens* (such as "?" between
  the two sentences of an entailment pair) as real tokens among them. Here, as in peft, all L_p virtual
  tokens form one prefix before the input; a template with anchor tokens can still be written into the
  input text by hand.
- Encoder. The paper's encoder is a bidirectional LSTM followed by a two-layer ReLU MLP (it also reports an
  MLP alone and the identity, "EMB", which is plain prompt tuning); we implement peft's two heads above.
- Use. The paper applies P-tuning with a frozen model (knowledge probing) and also together with fine-tuning
  the whole model (SuperGLUE); here the base model is always frozen.

Saving: we save Z and the encoder weights (the module's state_dict), so a saved adapter reloads bit-exact
and can keep training where it stopped (`load_adapter(..., is_trainable=True)`). peft instead saves only the
encoder's output P (a compact inference artefact, L_p·d numbers): a peft P-tuning adapter reloaded for
training restarts with a fresh encoder. For a compact artefact here, `to_prompt_tuning(model)` copies P
into a plain prompt-tuning adapter (same logits, L_p·d saved numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, check_choice, check_positive_int, check_probability, register
from .prompt_tuning import PrependedPrompt, PromptTuningConfig


@register
@dataclass
class PTuningConfig(PeftConfig):
    num_virtual_tokens: int = 20  # L_p (peft's default is none; 20 as our prompt tuning)
    encoder_type: str = "mlp"  # "mlp" or "lstm" (peft's encoder_reparameterization_type; peft's default MLP)
    encoder_hidden_size: int | None = None  # h; None: the model's hidden size d (as peft)
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has 3 linear layers)
    encoder_dropout: float = 0.0  # dropout between LSTM layers (as peft; the MLP has none)

    method = "p_tuning"
    kind = "input"

    def validate(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if isinstance(self.encoder_type, str):
            self.encoder_type = self.encoder_type.lower()  # peft spells them "MLP", "LSTM"
        check_choice("encoder_type", self.encoder_type, {"mlp", "lstm"})
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_probability("encoder_dropout", self.encoder_dropout)
        if self.encoder_type == "mlp" and self.encoder_num_layers != 2:
            raise ValueError(f"encoder_num_layers is only used by the LSTM encoder (the MLP has a fixed depth), "
                             f"got {self.encoder_num_layers} with encoder_type='mlp'")
        if self.encoder_type == "mlp" and self.encoder_dropout != 0:
            raise ValueError("encoder_dropout is only used between LSTM layers; the MLP encoder has no dropout")
        if self.target is not None:
            raise ValueError("P-tuning acts on the input embeddings and wraps no modules; leave target=None")

    def make_input_adapter(self, model):
        return PromptEncoder(model, self)


class PromptEncoder(PrependedPrompt):
    """Z (`embedding`) and the encoder f; the virtual tokens are f(Z), computed at every forward pass."""

    method_name = "P-tuning"

    def __init__(self, model: nn.Module, config: PTuningConfig):
        super().__init__()
        emb = model.get_input_embeddings().weight  # (V, d)
        d, L = emb.shape[1], config.num_virtual_tokens
        h = config.encoder_hidden_size or d
        self.num_virtual_tokens, self.encoder_type = L, config.encoder_type
        kw = dict(device=emb.device, dtype=torch.float32)  # fp32 (cast to the model's dtype in forward), as peft
        self.embedding = nn.Embedding(L, d, **kw)  # Z, init N(0, 1)
        if config.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))

    def virtual_tokens(self) -> torch.Tensor:
        Z = self.embedding.weight  # (L_p, d)
        if self.encoder_type == "lstm":
            H = self.lstm_head(Z.unsqueeze(0))[0][0]  # (L_p, 2h): forward and backward states side by side
            return self.mlp_head(H)  # (L_p, d)
        return self.mlp_head(Z)  # (L_p, d)


def p_tuning_parameter_count(d: int, num_virtual_tokens: int, encoder_type: str = "mlp",
                             encoder_hidden_size: int | None = None, encoder_num_layers: int = 2) -> int:
    """The trainable-parameter formula of the module docstring (no model needed)."""
    cfg = PTuningConfig(num_virtual_tokens=num_virtual_tokens, encoder_type=encoder_type,
                        encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers)
    check_positive_int("d", d)
    L, h, n = cfg.num_virtual_tokens, cfg.encoder_hidden_size or d, cfg.encoder_num_layers
    if cfg.encoder_type == "mlp":
        return L * d + 2 * d * h + h * h + 2 * h + d
    lstm = 2 * (4 * h * (d + h) + 8 * h) + (n - 1) * 2 * (4 * h * (2 * h + h) + 8 * h)
    return L * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@torch.no_grad()
def to_prompt_tuning(model, adapter_name: str | None = None, new_name: str | None = None) -> str:
    """Add a plain prompt-tuning adapter whose soft prompt is this P-tuning adapter's f(Z) (what peft saves).

    The result gives the same logits and saves L_p·d numbers instead of Z and the encoder. Returns its name
    (default: "<adapter_name>_prompt"); like any added adapter it waits, frozen, until set_adapter(name).
    """
    name = adapter_name or model.active_adapter
    if name not in model.input_adapters or not isinstance(model.input_adapters[name], PromptEncoder):
        raise ValueError(f"adapter {name!r} is not a P-tuning adapter")
    encoder = model.input_adapters[name]
    was_training = encoder.training
    encoder.eval()  # no LSTM dropout in the exported prompt
    P = encoder.virtual_tokens().float()
    encoder.train(was_training)
    new_name = new_name or f"{name}_prompt"
    model.add_adapter(new_name, PromptTuningConfig(num_virtual_tokens=encoder.num_virtual_tokens))
    model.input_adapters[new_name].prompt.copy_(P)
    return new_name


__all__ = ["PTuningConfig", "PromptEncoder", "p_tuning_parameter_count", "to_prompt_tuning"]
