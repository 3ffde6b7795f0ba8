"""A rotated (merged) model as a plain LLaMA checkpoint: train.py --export-hf writes OUT/hf.

rotate.save_rotated keeps the online Hadamards as modules, recorded in rotation.json: only this
project's loader puts them back. Here R4 is folded back into down_proj, so that any LLaMA loader
(transformers' LlamaForCausalLM, lm-evaluation-harness's hf model) computes the same function:

    export_plain_llama(model, "out/hf")     # LlamaForCausalLM.from_pretrained("out/hf")
"""
import torch.nn as nn

from model import save_checkpoint
from rotate import OnlineHadamard, walsh_hadamard_transform


def export_plain_llama(model, path):
    """Write a rotated (merged) model as a checkpoint any LLaMA loader runs unchanged, such as
    transformers' LlamaForCausalLM: R4's online Hadamard is folded back into down_proj
    ((z M^T)(W M^T)^T = z W^T, so down_proj gets W = (W M^T) M), exact up to one rounding; R3's
    online Hadamards on queries and keys cancel in every q.k and are left out; R1, R2 and the
    fused norms are plain LLaMA weights already. The model itself is not changed."""
    leftovers = sorted({type(m).__name__ for m in model.modules()} & {"LoRALinear", "ResLoRALinear", "QuantLinear",
                                                                       "ActQuantizer"})
    if leftovers:
        raise ValueError(f"export_plain_llama: the model still has {leftovers}; merge the adapters (merge_lora) "
                         "and export the full-precision model (quantizers have no plain LLaMA form)")
    folded = {}
    for i, layer in enumerate(model.layers):
        transform = layer.mlp.down_input_transform
        if isinstance(transform, OnlineHadamard):
            W = layer.mlp.down_proj.weight.detach()
            folded[f"layers.{i}.mlp.down_proj.weight"] = walsh_hadamard_transform(W.double(), transpose=True).to(W.dtype)
        elif not isinstance(transform, nn.Identity):
            raise ValueError(f"export_plain_llama: layers.{i}.mlp.down_input_transform is a "
                             f"{type(transform).__name__}, which has no plain LLaMA form")
        for name in ("query_transform", "key_transform"):  # R3 leaves every q.k as it is: drop it
            if not isinstance(getattr(layer.self_attn, name), (nn.Identity, OnlineHadamard)):
                raise ValueError(f"export_plain_llama: layers.{i}.self_attn.{name} is a "
                                 f"{type(getattr(layer.self_attn, name)).__name__}, which has no plain LLaMA form")
    save_checkpoint(model, path, replace=folded)
