"""minipeft: parameter-efficient fine-tuning from scratch, one readable file per method.

    import minipeft as mp
    model = mp.wrap(base, mp.LoRAConfig(r=8, alpha=16, target=["q_proj", "v_proj"]))
    model.trainable_summary()
    model.save_adapter("out/");  model = mp.load_adapter(base, "out/")
    model.save_adapter("out-peft/", format="peft")   # what peft.PeftModel.from_pretrained reads
"""
__version__ = "0.1.0"

from .config import REGISTRY, PeftConfig, register  # noqa: E402
from .layer import AdapterLayer, ModulesToSave  # noqa: E402
from .model import PeftModel, load_adapter, wrap  # noqa: E402
from .reparam import (AdaLoRAConfig, DoRAConfig, LoRAConfig, LoRAFAConfig, LoRALinear, MELoRAConfig,  # noqa: E402
                      MonteCLoRAConfig, MoSLoRAConfig, PropulsionConfig, VeRAConfig, loraplus_param_groups)
from .additive import AdapterConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig, PTuningConfig  # noqa: E402
from .selective import (BitFitConfig, FISHConfig, ID3Config, PaFiConfig, RandomMaskConfig,  # noqa: E402
                        RoCoFTConfig, SparseConfig)
from . import selective  # noqa: E402
from .quant import QLoRAConfig  # noqa: E402
from . import data, figures, runs, zoo  # noqa: E402
from .heads import PooledCollator, PooledModel, pool  # noqa: E402
from . import heads, mi  # noqa: E402
from . import memory  # noqa: E402  (not distributed: `python -m minipeft.distributed` must find it unloaded)
from .serving import serve  # noqa: E402
from .train import Trainer  # noqa: E402
from .evaluate import evaluate, interval  # noqa: E402

__all__ = ["wrap", "load_adapter", "PeftModel", "PeftConfig", "AdapterLayer", "ModulesToSave", "register",
           "REGISTRY", "LoRAConfig", "LoRALinear", "loraplus_param_groups", "DoRAConfig", "AdaLoRAConfig",
           "LoRAFAConfig", "VeRAConfig", "MELoRAConfig", "MoSLoRAConfig", "MonteCLoRAConfig", "PropulsionConfig",
           "RoCoFTConfig", "AdapterConfig", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "IA3Config",
           "BitFitConfig", "SparseConfig", "FISHConfig", "PaFiConfig", "ID3Config", "RandomMaskConfig", "QLoRAConfig",
           "selective", "data", "figures", "runs", "zoo", "Trainer", "evaluate", "interval",
           "PooledModel", "PooledCollator", "pool", "heads", "mi", "memory", "serve"]
