"""Saved quantized models (OUT/quantized): integer codes, scales and zero points, reloaded without calibration.

Beyond the paper, which measures fake-quantized models and saves none. It sits above rotate.py
and quant.py: a rotated quantized model needs both back.

A directory written by save_quantized: config.json, quantization.json (the QuantConfig and how
the codes are stored), rotation.json when the model was rotated (rotate.py's record; with
rotation.safetensors, the matrices, when the rotation was learned), and one
model.safetensors in the Hugging Face names. A quantized linear "<hf>.weight" is replaced by
    <hf>.qweight (out, ceil(in/2)) uint8 | (out, in) uint8 | (out, in) int16: k - qmin
    <hf>.scales  (out, n_groups) float32
    <hf>.zeros   (out, n_groups) uint8 (bits <= 8) | int16: the zero points (0 if symmetric)
and weight = scales * (k - zeros) per group of in / n_groups columns; every other tensor is
stored as save_checkpoint stores it.

    save_quantized(quant.quantize_model(model, w_bits=4, a_bits=4), "out/quantized")
    model = load_quantized("out/quantized")        # bit-identical fake-quantized outputs
"""
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from data.options import BadKey, BadValue, MissingFile
from model import (BLOCK_LINEARS, HF_IGNORED_SUFFIXES, Transformer, hf_state_dict_names, read_config, replace_module,
                   rope_inverse_frequencies, safetensors_files, write_atomically)
from quant import QuantConfig, QuantLinear, integer_range, quantize_model
from rotate import add_online_hadamards, load_learned_rotation, read_rotation_record, write_rotation_record

QUANT_RECORD = "quantization.json"  # listed in model.STAGE_RECORDS: load_checkpoint refuses the directory
CODE_SUFFIXES = (".qweight", ".scales", ".zeros")


def code_container(bits: int) -> str:
    """How a `bits`-bit code k - qmin (in [0, 2^bits - 1]) is stored."""
    return "uint4x2" if bits <= 4 else "uint8" if bits <= 8 else "int16"


def _integer_dtype(bits: int) -> torch.dtype:
    """The dtype of the stored codes (packed or not) and zero points of a `bits`-bit grid."""
    return torch.uint8 if bits <= 8 else torch.int16


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(rows, n) integers in [0, 15] -> (rows, ceil(n/2)) uint8: column 2j in the low nibble,
    2j + 1 in the high one (an odd n gets a 0 after its last column)."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_codes undone: (rows, ceil(n/2)) uint8 -> (rows, n) uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., :n]


def _dequantize(k: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale * (k - zero) in float32, the very operations of round_to_grid, so the result is
    bit for bit the weight quantization produced. k (out * n_groups, width); scale, zero (out * n_groups, 1)."""
    return (k - zero) * scale


def _quantization_record(config: QuantConfig, rotated: bool) -> dict:
    """quantization.json: the config, and how the codes of its weights are stored."""
    quantized = config.w_bits < 16
    return {"format_version": 1, "bits": config.w_bits, "group_size": config.w_group_size,
            "symmetric": config.w_symmetric,
            "packing": code_container(config.w_bits) if quantized else None,
            "code_offset": integer_range(config.w_bits, config.w_symmetric)[0] if quantized else None,  # qmin
            "rotated": rotated, "config": dataclasses.asdict(config)}


def _rebuild_stages(model: nn.Module, config: QuantConfig, rotation: dict | None, grids: dict) -> nn.Module:
    """Put back around a model's weights what rotate_model and quantize_model put there: the
    online Hadamard, a QuantLinear for every weight on a grid ({path: (scale, zero)}), the
    activation and KV quantizers of `config`. No weight is computed: the weights are already quantized."""
    if rotation is not None:
        add_online_hadamards(model, rotation["r4"], rotation.get("r3", False))
    for path, grid in grids.items():
        replace_module(model, path, QuantLinear(model.get_submodule(path).weight.detach(), grid=grid))
    quantize_model(model, dataclasses.replace(config, w_bits=16), progress=False)  # keeps the weights
    model.quant_config = config
    if rotation is not None:
        model.rotation = rotation
    return model


def _quantized_paths(model_config, config: QuantConfig) -> list[str]:
    n_layers = model_config.num_hidden_layers
    return [f"layers.{i}.{p}" for i in range(n_layers) for p in BLOCK_LINEARS] if config.w_bits < 16 else []


def _check_saveable(model: nn.Module, config: QuantConfig, rotation: dict | None):
    """Refuse what load_quantized could not rebuild exactly."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.Module):
            raise ValueError(f"save_quantized: {name} has LoRA adapters, which a quantized checkpoint does not "
                             "hold; merge them into the full-precision model and quantize again (merge, then "
                             "quantize), or save them apart with lora.save_adapters")
        if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
            raise ValueError(f"save_quantized: {name} holds a float weight quantized at every forward (QAT, "
                             "quantize_weight_every_forward); quantize the trained model with quantize_model "
                             "first, so that its weights are stored on their grid")
    # the module tree must be the one load_quantized builds from the records, module by module
    with torch.device("meta"):
        skeleton = Transformer(model.config)
    _rebuild_stages(skeleton, config, rotation, {path: None for path in _quantized_paths(model.config, config)})
    layout = lambda m: {name: f"{type(sub).__name__}({sub.extra_repr()})" for name, sub in m.named_modules()}
    expected, found = layout(skeleton), layout(model)
    for name in dict.fromkeys([*found, *expected]):
        if found.get(name) != expected.get(name):
            raise ValueError(f"save_quantized: {name} is {found.get(name, 'absent')} but a model quantized with "
                             f"its quant_config ({config.label()}){' and rotation' if rotation else ''} has "
                             f"{expected.get(name, 'nothing')} there, so it would not reload as it is (quantized "
                             "more than once, or a module changed by hand?)")


@torch.no_grad()
def save_quantized(model: nn.Module, path):
    """Write a model quantized by quantize_model (maybe rotated first) as integer codes, scales
    and zero points + quantization.json (+ rotation.json), so that load_quantized gives it back,
    bit for bit, with no calibration. Everything is checked before anything is written."""
    from safetensors.torch import save_file
    config, rotation = getattr(model, "quant_config", None), getattr(model, "rotation", None)
    if not isinstance(config, QuantConfig):
        raise ValueError("save_quantized: the model has no quant_config; quantize it with quantize_model first")
    _check_saveable(model, config, rotation)
    quantized = set(_quantized_paths(model.config, config))
    qmin, qmax = integer_range(config.w_bits, config.w_symmetric) if quantized else (None, None)
    integer_dtype = _integer_dtype(config.w_bits)
    tensors = {}
    for hf_name, ours in hf_state_dict_names(model.config).items():
        module_path = ours.removesuffix(".weight")
        module = model.get_submodule(module_path)
        if module_path not in quantized:
            tensors[hf_name] = module.weight.detach().to("cpu").contiguous()
            continue
        weight, scale, zero = module.weight.detach(), module.weight_scale, module.weight_zero
        if scale is None:
            raise ValueError(f"save_quantized: {module_path} has no integer grid (weight_scale) although "
                             f"quant_config has w_bits={config.w_bits}")
        scale, zero = scale.float().reshape(-1, 1), zero.float().reshape(-1, 1)  # (out * n_groups, 1)
        k = torch.round(weight.float().reshape(scale.shape[0], -1) / scale) + zero  # (out * n_groups, width)
        k_min, k_max = torch.aminmax(k)
        if k_min < qmin or k_max > qmax or not torch.equal(
                _dequantize(k, scale, zero).reshape(weight.shape).to(weight.dtype), weight):
            raise ValueError(f"save_quantized: {module_path}.weight is not on its {config.w_bits}-bit grid "
                             "(weight_scale, weight_zero): changed or cast after quantization? Quantize again")
        codes = (k - qmin).reshape(weight.shape)  # (out, in), in [0, 2^bits - 1]
        codes = pack_codes(codes) if code_container(config.w_bits) == "uint4x2" else codes.to(integer_dtype)
        out_features = weight.shape[0]
        stored = (codes, scale.view(out_features, -1), zero.view(out_features, -1).to(integer_dtype))
        base = hf_name.removesuffix(".weight")
        tensors.update({base + suffix: t.to("cpu").contiguous() for suffix, t in zip(CODE_SUFFIXES, stored)})

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    record = _quantization_record(config, rotation is not None)
    # the records first: a directory never holds these weights without them
    if rotation is not None:  # (+ rotation.safetensors for a learned one: checked before it writes anything)
        write_rotation_record(path, rotation, getattr(model, "learned_rotation", None))
    else:
        for stale in ("rotation.json", "rotation.safetensors"):  # an earlier save's, in this directory
            (path / stale).unlink(missing_ok=True)
    write_atomically(path / QUANT_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()  # never leave a stale shard next to the new file
    write_atomically(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    write_atomically(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2)))


def read_quantization_record(path) -> tuple[QuantConfig, bool]:
    """(QuantConfig, rotated) of a directory written by save_quantized, every field checked."""
    record_file = Path(path) / QUANT_RECORD
    if not record_file.is_file():
        raise MissingFile(f"{record_file}: no quantization record; was this saved by save_quantized?")
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as e:
        raise BadValue(f"{record_file}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        raise BadValue(f"{record_file}: expected a JSON object whose 'config' is an object")
    names, config_fields = [f.name for f in dataclasses.fields(QuantConfig)], record.get("config", {})
    missing = [key for key in _quantization_record(QuantConfig(), False) if key not in record]
    missing += [f"config.{name}" for name in names if "config" in record and name not in config_fields]
    if missing:
        raise BadKey(f"{record_file}: missing field(s) {missing}")
    unknown = [f"config.{name}" for name in config_fields if name not in names]
    if unknown:
        raise BadKey(f"{record_file}: unknown field(s) {unknown}")
    try:
        config = QuantConfig(**config_fields)
        config.validate()
    except (TypeError, ValueError) as e:
        raise BadValue(f"{record_file}: invalid config ({e})") from None
    for key, value in _quantization_record(config, record["rotated"]).items():
        if record[key] != value:
            raise BadValue(f"{record_file}: field '{key}' is {record[key]!r}; its config implies {value!r}")
    return config, record["rotated"]


def _read_tensors(path: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of a checkpoint directory, with the file it came from."""
    from safetensors import SafetensorError, safe_open
    tensors = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                tensors.update({name: (f.get_tensor(name), file) for name in f.keys()})
        except (SafetensorError, OSError) as e:
            raise BadValue(f"{file}: unreadable or truncated safetensors file ({e})") from None
    return tensors


@torch.no_grad()
def load_quantized(path, dtype=torch.float32, device="cpu") -> nn.Module:
    """The model save_quantized wrote, rebuilt without calibration: QuantLinears holding
    scale * (k - zero) (bit for bit the saved weights), the activation, KV and lm_head input
    quantizers its QuantConfig names, the online Hadamard of its rotation record."""
    path = Path(path)
    config, rotated = read_quantization_record(path)
    model_config = read_config(path)
    rotation = None
    if rotated:
        rotation = read_rotation_record(path, model_config)
        if rotation is None:
            raise MissingFile(f"{path / 'rotation.json'}: missing, but {path / QUANT_RECORD} says the "
                                    "model is rotated (its online Hadamard would be lost)")
    with torch.device("meta"):
        model = Transformer(model_config)
    stored = _read_tensors(path)  # {key: (tensor, file)}; take() pops what it reads
    files = safetensors_files(path)
    source = {key: file for key, (_, file) in stored.items()}
    where = lambda key: source.get(key, files[0] if len(files) == 1 else path)  # the file an error names
    quantized = set(_quantized_paths(model_config, config))

    def take(key: str, shape: tuple, dtypes: tuple) -> torch.Tensor:
        if key not in stored:
            raise BadKey(f"{where(key)}: missing key '{key}'")
        tensor = stored.pop(key)[0]
        if tuple(tensor.shape) != shape:
            raise BadValue(f"{where(key)}: key '{key}' has shape {tuple(tensor.shape)}, config.json implies {shape}")
        if dtypes and tensor.dtype not in dtypes:
            raise BadValue(f"{where(key)}: key '{key}' is {tensor.dtype}, {QUANT_RECORD} implies {dtypes[0]}")
        return tensor

    plain, grids = {}, {}
    for hf_name, ours in hf_state_dict_names(model_config).items():
        module_path = ours.removesuffix(".weight")
        shape = tuple(model.get_submodule(module_path).weight.shape)
        if module_path not in quantized:
            plain[ours] = take(hf_name, shape, ()).to(device=device, dtype=dtype)
            continue
        out_features, in_features = shape
        base, bits, group_size = hf_name.removesuffix(".weight"), config.w_bits, config.w_group_size
        if group_size is not None and in_features % group_size:
            raise BadValue(f"{path / QUANT_RECORD}: group_size={group_size} does not divide the width "
                             f"{in_features} of {module_path} (config.json)")
        n_groups = 1 if group_size is None else in_features // group_size
        packed = code_container(bits) == "uint4x2"
        codes = take(base + ".qweight", (out_features, (in_features + 1) // 2) if packed else shape,
                     (_integer_dtype(bits),))
        scale = take(base + ".scales", (out_features, n_groups), (torch.float32,))
        zero = take(base + ".zeros", (out_features, n_groups), (_integer_dtype(bits),))
        codes = (unpack_codes(codes, in_features) if packed else codes).int()  # k - qmin, (out, in)
        zero_max = 0 if config.w_symmetric else 2 ** bits - 1  # a symmetric grid has zero = 0
        grid_kind = f"{bits}-bit {'symmetric' if config.w_symmetric else 'asymmetric'}"
        for key, values, high in ((".qweight", codes, 2 ** bits - 1), (".zeros", zero.int(), zero_max)):
            low_value, high_value = torch.aminmax(values)
            if low_value < 0 or high_value > high:
                raise BadValue(f"{where(base + key)}: key '{base + key}' holds {int(low_value)}..{int(high_value)}"
                                 f", out of range 0..{high} for a {grid_kind} grid")
        if not (torch.isfinite(scale) & (scale > 0)).all():
            raise BadValue(f"{where(base + '.scales')}: key '{base}.scales' holds a scale that is not "
                             "positive and finite")
        qmin, _ = integer_range(bits, config.w_symmetric)
        scale, zero = scale.reshape(-1, 1), zero.float().reshape(-1, 1)  # (out * n_groups, 1)
        k = codes.float().reshape(scale.shape[0], -1) + qmin  # (out * n_groups, width)
        plain[ours] = _dequantize(k, scale, zero).reshape(shape).to(device=device, dtype=dtype)
        grids[module_path] = (scale.view(out_features, -1).to(device), zero.view(out_features, -1).to(device))
    unexpected = [key for key in stored if not key.endswith(HF_IGNORED_SUFFIXES)]
    if unexpected:
        raise BadKey(f"{where(unexpected[0])}: unexpected key '{unexpected[0]}' for this config.json and "
                       f"{QUANT_RECORD} (w_bits={config.w_bits})")
    model.load_state_dict(plain, strict=False, assign=True)
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_inv_freq = rope_inverse_frequencies(model_config).to(device)
    if rotation is not None and "learned" in rotation:
        model.learned_rotation = load_learned_rotation(path, rotation)
    return _rebuild_stages(model, config, rotation, grids).eval()
