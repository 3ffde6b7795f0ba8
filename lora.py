"""LoRA and ResLoRA adapters for model.py's Transformer: add, train, merge, save and load (PEFT layout).

LoRA (Hu et al. 2021) freezes a linear W (out, in) and learns a low-rank update next to it:
    h = W x + s * B A dropout(x),   A (r, in) Kaiming-uniform, B (out, r) zeros, s = alpha / r
B = 0 makes the adapted model start as exactly the pre-trained one. After fine-tuning the update is
merged, W' = W + s B A, and the model is a plain Transformer again (RoLoRA step 7: quant.py then
quantizes W'). On a rotated model (rotate.py) the adapters are trained on the rotated weights, so
the merged weights stay in the outlier-free basis ("LoRA After Rotation").

ResLoRA (arXiv 2402.18039, ../shared/docs/PAPERS.md) adds shortcuts between the LoRA blocks of the
same projection (say q_proj) in consecutive layers n-k -> n, with x_n the projection's input in layer n:
    input:  h_n = W_n x_n + s B_n A_n (x_n + x_{n-1})                  (layer 0: x_{-1} = x_0)
    block:  h_n = W_n x_n + s (sum_{k=0..m} B_{n-k} A_{n-k}) x_n
    middle: h_n = W_n x_n + s B_n (sum_{k=0..m} A_{n-k} x_{n-k})       (m = pre_num)
and merges them away for inference: exactly for `block`, approximately for `input` and `middle`
(see ResLoRAChain.input_ratio).

Usage (train.py composes these):
    model = add_lora(model, targets=("q_proj", "v_proj"), rank=16, alpha=16)
    mark_only_lora_trainable(model)
    ...train...
    save_adapters(model, "out/adapters")   # PEFT: PeftModel.from_pretrained(llama, "out/adapters")
    merge_lora(model)                      # a plain Transformer holding W + s B A

Tests: python -m pytest tests/test_lora.py -q
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from data.options import BadKey, BadValue, MissingFile, check_options, option
from model import BLOCK_LINEARS, replace_module, write_atomically

VARIANTS = ("lora", "reslora")
RES_TYPES = ("input", "block", "middle")
RESLORA_MERGES = ("input", "weight")

# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: base(x) + s * B(A(dropout(x))).

    `base_layer` is an nn.Linear or any look-alike with .weight, .in_features, .out_features and a
    forward (quant.py's QuantLinear). `.weight` is the base weight (merged when `merged`), so
    model.save_checkpoint reads a wrapped model like a plain one; merge first to save the adapted
    function. Merging is only defined for a full-precision nn.Linear base: adding s B A into a
    quantized weight would move it off its quantization grid, so merge, then quantize."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scaling = alpha / rank
        w = base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32  # an integer base: fp32 adapters
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # nn.Linear submodules give the state-dict names PEFT uses: "<module>.lora_A.weight"
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and litgpt
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.module_path = ""  # where add_lora put it ('layers.0.self_attn.q_proj'), for error messages

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) without the scaling, in the adapters' dtype: (..., in) -> (..., out)."""
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))

    def forward(self, x):
        out = self.base_layer(x)  # (..., out)
        if self.merged:
            return out
        return out + (self.scaling * self.lora_path(self.lora_dropout(x))).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A (out, in) in float32 (float64 for a float64 base): merging rounds only once."""
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))

    @torch.no_grad()
    def _add_to_base_weight(self, delta: torch.Tensor):
        if type(self.base_layer) is not nn.Linear:
            where = f"LoRALinear {self.module_path}" if self.module_path else "LoRALinear"
            raise TypeError(f"{where}: cannot merge into a {type(self.base_layer).__name__} base "
                            "(merging moves a quantized weight off its grid): merge the adapters into "
                            "the full-precision model first, then quantize it")
        w = self.base_layer.weight
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))

    def merge(self):
        """W <- W + s B A; forward then skips the adapter path. A second call does nothing."""
        if not self.merged:
            self._add_to_base_weight(self.delta_weight())
            self.merged = True

    def unmerge(self):
        """W <- W - s B A (the base weight back, up to one rounding). A second call does nothing."""
        if self.merged:
            self._add_to_base_weight(-self.delta_weight())
            self.merged = False


# -----------------------------------------------------------------------------
# Adding, training and merging adapters on a model (plain LoRA and ResLoRA alike)


def _linears_in_layers(model: nn.Module, adapted_ok: bool = False) -> dict[str, nn.Module]:
    """The linears of every block (model.BLOCK_LINEARS) by name, e.g. 'layers.3.self_attn.q_proj'.
    With adapted_ok a LoRALinear counts as the linear it wraps; otherwise one is an error."""
    found = {f"layers.{i}.{path}": layer.get_submodule(path)
             for i, layer in enumerate(model.layers) for path in BLOCK_LINEARS}
    adapted = [name for name, module in found.items() if isinstance(module, LoRALinear)]
    if adapted and not adapted_ok:
        raise ValueError(f"the model already has LoRA adapters ({adapted[0]}); merge_lora or remove_lora first")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@dataclass
class LoRAConfig:
    """The adapter options of train.py, each one a flag (model.parse_config)."""
    variant: str = option("lora", "LoRA or ResLoRA adapters", choices=VARIANTS)
    targets: str = option("q_proj,v_proj", "comma-separated linears of a block to adapt")
    rank: int = option(16, "LoRA rank r", at_least=1)
    alpha: float = option(16.0, "LoRA alpha (scaling alpha / r)")
    dropout: float = option(0.0, "dropout on the adapter input, in [0, 1)", at_least=0.0)
    res_type: str = option("block", "ResLoRA shortcut", choices=RES_TYPES)
    pre_num: int = option(1, "ResLoRA: how many previous blocks feed the shortcut", at_least=1)
    reslora_merge: str = option("input", "ResLoRA merge estimate for the input/middle shortcuts",
                                choices=RESLORA_MERGES)

    def validate(self):
        check_options(self)
        if not self.dropout < 1:
            raise ValueError(f"--dropout={self.dropout}: must be in [0, 1)")
        if self.variant == "reslora" and self.res_type == "input" and self.pre_num != 1:
            raise ValueError(f"--pre-num={self.pre_num}: the input shortcut takes exactly one previous block")
        names = {path.rsplit(".", 1)[-1] for path in BLOCK_LINEARS}
        unknown = [t for t in self.targets.split(",") if t.rsplit(".", 1)[-1] not in names]
        if unknown:
            raise ValueError(f"--targets={self.targets!r}: {unknown} not among the linears of a block: "
                             f"{', '.join(sorted(names))}")

    def add_to(self, model: nn.Module) -> nn.Module:
        """add_lora with these settings."""
        return add_lora(model, tuple(self.targets.split(",")), self.rank, self.alpha, self.dropout,
                        self.variant, self.res_type, self.pre_num)


def add_lora(model: nn.Module, targets=("q_proj", "v_proj"), rank: int = 16, alpha: float = 16,
             dropout: float = 0.0, variant: str = "lora", res_type: str = "block", pre_num: int = 1,
             norm_window: int = 100) -> nn.Module:
    """Wrap every linear in model.layers whose name ends with one of `targets` ("q_proj", or a
    longer suffix such as "layers.0.self_attn.q_proj") in a LoRALinear, in place. Adapters are
    created with the base weight's dtype and device, drawing A from torch's global RNG.
    variant="reslora": ResLoRA's chained adapters instead (add_reslora, the last section)."""
    if variant == "reslora":
        return add_reslora(model, targets, rank, alpha, dropout, res_type, pre_num, norm_window)
    if variant != "lora":
        raise ValueError(f"LoRA variant must be one of {VARIANTS}, got '{variant}'")
    linears = _linears_in_layers(model)
    for name in _chosen_linears(linears, targets):
        _put_wrapper(model, name, LoRALinear(linears[name], rank, alpha, dropout))
    return model


def _chosen_linears(linears: dict[str, nn.Module], targets) -> list[str]:
    """The names of `linears` that match a target, in layer order."""
    if isinstance(targets, str):
        targets = (targets,)
    chosen = []
    for target in targets:
        matches = [name for name in linears if name == target or name.endswith("." + target)]
        if not matches:
            valid = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"LoRA target '{target}' matches no linear in model.layers; valid names: "
                             f"{', '.join(valid)}")
        chosen += [name for name in matches if name not in chosen]
    return sorted(chosen, key=lambda name: int(name.split(".")[1]))


def _put_wrapper(model: nn.Module, name: str, wrapper: "LoRALinear"):
    wrapper.train(wrapper.base_layer.training)  # a new Module is in train mode; keep the model's mode
    wrapper.module_path = name
    replace_module(model, name, wrapper)


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """requires_grad=True on the A and B matrices only; everything else frozen."""
    if not lora_modules(model):
        raise ValueError("mark_only_lora_trainable: the model has no LoRA adapters (call add_lora)")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module, reslora_merge: str = "input") -> nn.Module:
    """Fold every adapter into its base weight and put the base linears back: a plain model.
    reslora_merge: how ResLoRA's input and middle shortcuts are estimated (fix_reslora_merges)."""
    wrappers = lora_modules(model)
    for name, m in wrappers.items():  # check all before changing any
        if type(m.base_layer) is not nn.Linear:
            raise TypeError(f"merge_lora: {name} wraps a {type(m.base_layer).__name__}; merge the adapters "
                            "into the full-precision model first, then quantize it")
    fix_reslora_merges(wrappers.values(), reslora_merge)  # ResLoRA: before any weight changes
    for name, m in wrappers.items():
        m.merge()
        replace_module(model, name, m.base_layer)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the base linears back without merging (undo add_lora; a merged wrapper is unmerged first)."""
    for name, m in lora_modules(model).items():
        m.unmerge()
        replace_module(model, name, m.base_layer)
    return model


def _is_adapter_key(key: str) -> bool:
    return key.endswith((".lora_A.weight", ".lora_B.weight", ".input_norms"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (A, B, and ResLoRA's input-norm windows), by our module names."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict",
                         key_prefix: str = ""):
    """Copy lora_state_dict() output back into a model with the same adapters; every key must
    match. Errors name `source` and the key as stored there (key_prefix + our name)."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise BadKey(f"{source}: missing key '{key_prefix}{missing[0]}' ({len(missing)} adapter "
                       "tensors missing)")
    if unexpected:
        raise BadKey(f"{source}: unexpected key '{key_prefix}{unexpected[0]}' (the model has no such adapter)")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise BadValue(f"{source}: key '{key_prefix}{key}' has shape {tuple(state[key].shape)}, "
                             f"the model's adapter has {tuple(target.shape)}")
        target.copy_(state[key])


# -----------------------------------------------------------------------------
# PEFT layout: adapter_model.safetensors + adapter_config.json

PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM -> LlamaModel
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Fields of PEFT's LoraConfig that change the function, with the only value we implement.
PEFT_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                    "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
                    "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
                    "layer_replication": None, "trainable_token_indices": None, "exclude_modules": None,
                    "use_qalora": False, "alora_invocation_tokens": None}


def save_adapters(model: nn.Module, directory, base_model_name_or_path: str | None = None):
    """Write the adapters as PEFT does, so PeftModel.from_pretrained(LlamaForCausalLM, directory)
    loads plain-LoRA adapters onto the same base. ResLoRA adapters are written with
    peft_type "RESLORA" and a "reslora" section: PEFT refuses them (it cannot compute the
    shortcuts) instead of silently loading them as plain LoRA; load_adapters reads them."""
    from safetensors.torch import save_file

    wrappers = lora_modules(model)
    if not wrappers:
        raise ValueError("save_adapters: the model has no LoRA adapters")
    settings = {(m.rank, m.alpha, m.dropout, type(m)) for m in wrappers.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapters: adapters differ in rank/alpha/dropout/variant {settings}; "
                         "PEFT's layout here holds one setting")
    rank, alpha, dropout, kind = settings.pop()
    # Suffixes when every layer's projection is adapted, else the exact module names.
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in wrappers})
    every = [n for n in _linears_in_layers(model, adapted_ok=True) if n.rsplit(".", 1)[-1] in suffixes]
    targets = suffixes if sorted(every) == sorted(wrappers) else sorted(wrappers)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
              "init_lora_weights": True, "inference_mode": True, "revision": None, "layers_pattern": None}
    config |= PEFT_UNSUPPORTED
    if kind is ResLoRALinear:
        chain = next(iter(wrappers.values())).chain
        config["peft_type"] = "RESLORA"
        config["reslora"] = {"res_type": chain.res_type, "pre_num": chain.pre_num,
                             "norm_window": next(iter(wrappers.values())).input_norms.numel()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    write_atomically(directory / ADAPTER_WEIGHTS,
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(directory / ADAPTER_CONFIG,
                      lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))


def load_adapters(model: nn.Module, directory) -> nn.Module:
    """Add adapters to `model` as `directory`'s adapter_config.json describes and load their
    weights from adapter_model.safetensors (ours or PEFT's). Every key must be present with the
    right shape; anything else is an error naming the file and key."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise MissingFile(f"{f}: not found (a PEFT adapter directory holds {ADAPTER_CONFIG} "
                                    f"and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise BadValue(f"{config_file}: not valid JSON ({e})") from None
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "RESLORA"):
        raise BadValue(f"{config_file}: peft_type '{peft_type}' is not supported (LORA or RESLORA)")
    for key, implemented in PEFT_UNSUPPORTED.items():
        value = config.get(key)
        if value and value != implemented:
            raise BadValue(f"{config_file}: {key}={value!r} is not supported (only {implemented!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise BadKey(f"{config_file}: missing field '{key}'")
    targets = config["target_modules"]
    if isinstance(targets, list):  # PEFT's names may carry LlamaForCausalLM's "model." prefix
        targets = [t.removeprefix("model.") for t in targets]
    elif isinstance(targets, str):  # PEFT: a regex that must match the whole HF module name
        targets = [n for n in _linears_in_layers(model) if re.fullmatch(targets, "model." + n)]
        if not targets:
            raise BadValue(f"{config_file}: target_modules regex {config['target_modules']!r} "
                             "matches no linear in model.layers")
    reslora = config.get("reslora", {}) if peft_type == "RESLORA" else {}
    stored = load_file(str(weights_file))
    for key in stored:
        if not key.startswith(PEFT_PREFIX):
            raise BadKey(f"{weights_file}: unexpected key '{key}' (expected '{PEFT_PREFIX}layers.<i>...')")
    add_lora(model, targets, rank=config["r"], alpha=config["lora_alpha"],
             dropout=config.get("lora_dropout", 0.0), variant="reslora" if reslora else "lora",
             res_type=reslora.get("res_type", "block"), pre_num=reslora.get("pre_num", 1),
             norm_window=reslora.get("norm_window", 100))
    try:
        load_lora_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in stored.items()},
                             source=str(weights_file), key_prefix=PEFT_PREFIX)
    except (KeyError, ValueError):
        remove_lora(model)  # leave the model as it was given
        raise
    return model


# -----------------------------------------------------------------------------
# ResLoRA: shortcuts between the LoRA blocks of one projection in consecutive layers


def add_reslora(model: nn.Module, targets=("q_proj", "v_proj"), rank: int = 16, alpha: float = 16,
                dropout: float = 0.0, res_type: str = "block", pre_num: int = 1, norm_window: int = 100):
    """add_lora's ResLoRA variant: the wrappers of the same projection across layers are linked in a
    ResLoRAChain (res_type; pre_num = m previous blocks; the input shortcut uses exactly one)."""
    if res_type not in RES_TYPES:
        raise ValueError(f"ResLoRA res_type must be one of {RES_TYPES}, got '{res_type}'")
    if pre_num < 1 or (res_type == "input" and pre_num != 1):
        raise ValueError(f"ResLoRA pre_num={pre_num}: must be >= 1, and exactly 1 for the input "
                         "shortcut (h_n = W_n x_n + s B_n A_n (x_n + x_{n-1}))")
    linears = _linears_in_layers(model)
    chains = {}  # "self_attn.q_proj" -> its chain, filled in layer order
    for name in _chosen_linears(linears, targets):
        chain = chains.setdefault(name.split(".", 2)[2], ResLoRAChain(res_type, pre_num))
        _put_wrapper(model, name, ResLoRALinear(linears[name], rank, alpha, dropout, chain, norm_window))
    return model


def fix_reslora_merges(wrappers, how: str = "input"):
    """Fix the merge coefficients of every unmerged ResLoRA wrapper among `wrappers` (plain LoRA ones
    are skipped) before any of them merges, so the merged weights do not depend on the layers'
    order. how: the estimate of an earlier layer's input (ResLoRAChain.input_ratio)."""
    if how not in RESLORA_MERGES:
        raise ValueError(f"reslora_merge must be one of {RESLORA_MERGES}, got '{how}'")
    pending = [m for m in wrappers if isinstance(m, ResLoRALinear) and not m.merged]
    coefficients = [m.compute_merge_coefficients(how) for m in pending]
    for m, c in zip(pending, coefficients):
        m.merge_coefficients = c


class ResLoRAChain:
    """The ResLoRA wrappers of one projection (e.g. every layer's q_proj) in layer order, plus what
    one forward hands from layer n-k to layer n: x_n (input shortcut) or A_n dropout(x_n) (middle).

    Layer 0 starts every forward, so it drops whatever the previous forward handed over: nothing
    stale is ever read, and a layer that runs out of order is an error. The handed-over tensors
    keep their autograd history (gradients flow through the shortcuts) and stay until the next
    forward, which is what gradient checkpointing needs: it recomputes block n during backward,
    after the forward, and block n must then receive the same x_{n-1} again. A plain Python
    object, not a Module: not in the state dict, not a second owner of the wrappers' parameters,
    and copies (deepcopy, pickle) leave the handed-over tensors behind."""

    def __init__(self, res_type: str, pre_num: int):
        self.res_type, self.pre_num = res_type, pre_num
        self.layers: list["ResLoRALinear"] = []
        self.handed_over: dict[int, torch.Tensor] = {}

    def __getstate__(self):
        return self.__dict__ | {"handed_over": {}}

    def window(self, n: int) -> list["ResLoRALinear"]:
        """Layers n, n-1, ..., n-m (fewer near the start)."""
        return [self.layers[j] for j in range(n, max(n - self.pre_num, 0) - 1, -1)]

    def hand_over(self, n: int, tensor: torch.Tensor):
        if n == 0:  # a new forward
            self.handed_over = {}
        self.handed_over[n] = tensor

    def received(self, j: int, n: int, like: torch.Tensor) -> torch.Tensor:
        if j not in self.handed_over:
            raise RuntimeError(f"ResLoRA ({self.res_type} shortcut): layer {n} ran before layer {j} in "
                               "this forward; the shortcuts need the layers to run in order from layer 0")
        got = self.handed_over[j]
        if got.shape[:-1] != like.shape[:-1]:
            raise RuntimeError(f"ResLoRA: layer {j} handed over shape {tuple(got.shape)} but layer {n} "
                               f"runs on {tuple(like.shape)}: the layers ran in different forwards")
        return got

    # Merging. The input and middle shortcuts read x_j (j < n) while layer n merges into weights
    # that only see x_n, so they assume x_j ~ c x_n with c estimated as below; exact when every
    # layer's input is a positively scaled copy of the layer before's, approximate otherwise.
    def input_ratio(self, j: int, n: int, how: str) -> float:
        """The estimate c ~ ||x_j|| / ||x_n|| (j <= n) that the input/middle merges use.

        how="input": f_j / f_n, f = mean per-token input norm over the last training forwards.
        how="weight": the product over i = j+1..n of ||W*_{i-2}||_F / ||W*_{i-1}||_F (the paper's
        weight-based a_i, "Frobenius norms of the merged weights of the two previous blocks",
        W* = W + s B A), with a_1 = 1 since layer 0 has no block before it."""
        if how not in RESLORA_MERGES:
            raise ValueError(f"reslora_merge must be one of {RESLORA_MERGES}, got '{how}'")
        if how == "input":
            return self.layers[j].mean_input_norm() / self.layers[n].mean_input_norm()
        ratio = 1.0
        for i in range(max(j + 1, 2), n + 1):
            ratio *= self.layers[i - 2].lora_weight_norm() / self.layers[i - 1].lora_weight_norm()
        return ratio


class ResLoRALinear(LoRALinear):
    """One layer's LoRA block in a ResLoRA chain (the equations at the top of this file).

    In train mode the input and middle variants record the mean per-token norm of their input in
    a window of the last `norm_window` forwards (the buffer `input_norms`, saved with the adapters)
    for the input-based merge; nothing needs to be called for it, and eval mode stops recording.
    (Gradient checkpointing reruns each forward once more in backward, so the window then holds
    every step twice: the same mean over the last norm_window / 2 steps.)"""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float,
                 chain: ResLoRAChain, norm_window: int = 100):
        super().__init__(base_layer, rank, alpha, dropout)
        self.chain, self.position = chain, len(chain.layers)
        chain.layers.append(self)
        if chain.layers[0].lora_A.weight.shape != self.lora_A.weight.shape or \
                chain.layers[0].lora_B.weight.shape != self.lora_B.weight.shape:
            raise ValueError("ResLoRA: every layer of a chain must have the same in/out features")
        # NaN marks "no forward recorded yet"; a shift register keeps the last norm_window values
        self.register_buffer("input_norms", torch.full((norm_window,), float("nan"), device=self.weight.device))
        self.merge_coefficients = None  # what merge() uses, so unmerge() subtracts the same update

    def _record_input_norm(self, x):
        norm = x.detach().float().norm(dim=-1).mean().to(self.input_norms.device)
        self.input_norms.copy_(torch.cat([self.input_norms[1:], norm.view(1)]))  # no host sync

    def mean_input_norm(self) -> float:
        seen = self.input_norms[~self.input_norms.isnan()]
        if seen.numel() == 0:
            raise RuntimeError("ResLoRA: no training forward was recorded, so the input-based merge "
                               "has no input norms; train first or merge with reslora_merge='weight'")
        return seen.double().mean().item()

    def forward(self, x):
        out = self.base_layer(x)  # (..., out)
        chain, n, res_type = self.chain, self.position, self.chain.res_type
        if res_type == "block":  # s (sum_k B_{n-k} A_{n-k}) x_n: no state
            if self.merged:
                return out
            x = self.lora_dropout(x)
            update = sum(layer.lora_path(x) for layer in chain.window(n))
            return out + (self.scaling * update).to(out.dtype)

        if self.training and not self.merged:
            self._record_input_norm(x)
        if res_type == "input":  # s B_n A_n (x_n + x_{n-1})
            previous = x if n == 0 else chain.received(n - 1, n, x)
            chain.hand_over(n, x)
            update = None if self.merged else self.lora_path(self.lora_dropout(x + previous))
        else:  # middle: s B_n (sum_k A_{n-k} x_{n-k})
            xa = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))  # (..., r)
            summed = xa + sum(chain.received(layer.position, n, x) for layer in chain.window(n)[1:])
            chain.hand_over(n, xa)
            update = None if self.merged else self.lora_B(summed)
        return out if update is None else out + (self.scaling * update).to(out.dtype)

    def compute_merge_coefficients(self, how: str = "input"):
        """input: a (W*_n = W_n + (1 + a) s B_n A_n); middle: [c_1..c_m] (A*_n = A_n + sum_k c_k A_{n-k});
        block: None (exact)."""
        n, chain = self.position, self.chain
        if chain.res_type == "input":
            return 1.0 if n == 0 else chain.input_ratio(n - 1, n, how)  # layer 0: x_{-1} = x_0 exactly
        if chain.res_type == "middle":
            return [chain.input_ratio(layer.position, n, how) for layer in chain.window(n)[1:]]
        return None

    def delta_weight(self, coefficients=None) -> torch.Tensor:
        if coefficients is None:
            coefficients = self.merge_coefficients
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        def A(layer): return layer.lora_A.weight.to(dtype)  # noqa: E704
        def B(layer): return layer.lora_B.weight.to(dtype)  # noqa: E704
        window = self.chain.window(self.position)
        if self.chain.res_type == "block":  # exact: W*_n = W_n + s sum_k B_{n-k} A_{n-k}
            return self.scaling * sum(B(layer) @ A(layer) for layer in window)
        if coefficients is None:
            raise RuntimeError("ResLoRA input/middle delta_weight needs merge coefficients "
                               "(compute_merge_coefficients)")
        if self.chain.res_type == "input":  # x_{n-1} ~ a x_n
            return (1.0 + coefficients) * self.scaling * (B(self) @ A(self))
        merged_A = A(self) + sum(c * A(layer) for c, layer in zip(coefficients, window[1:]))
        return self.scaling * (B(self) @ merged_A)  # middle: x_{n-k} ~ c_k x_n

    @torch.no_grad()
    def lora_weight_norm(self) -> float:
        """||W + s B A||_F with W the weight before any ResLoRA merge of this layer."""
        w = self.weight.to(torch.float64)
        if self.merged:
            w = w - self.delta_weight().to(torch.float64)
        return torch.linalg.matrix_norm(w + LoRALinear.delta_weight(self).to(torch.float64)).item()

    def merge(self, how: str = "input", coefficients=None):
        """Fold the update (with the shortcut approximation `how`, see ResLoRAChain.input_ratio)
        into the base weight: with `coefficients`, or those fix_reslora_merges fixed, or new ones."""
        if not self.merged:
            if coefficients is None:
                coefficients = self.merge_coefficients
            if coefficients is None:
                coefficients = self.compute_merge_coefficients(how)
            self._add_to_base_weight(self.delta_weight(coefficients))
            self.merge_coefficients, self.merged = coefficients, True

    def unmerge(self):
        if self.merged:
            self._add_to_base_weight(-self.delta_weight())
            self.merge_coefficients, self.merged = None, False
