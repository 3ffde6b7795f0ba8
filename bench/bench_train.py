"""LoRA fine-tuning step: ours (model.py + lora.py) against transformers + PEFT.

Same config (SmolLM2-135M shape by default), same weights, LoRA r=16 on q_proj/v_proj, AdamW,
same batch and dtype, measured in the same run; each implementation in its own subprocess so
that its peak resident memory (ru_maxrss) is its own. A third run compiles our blocks
(extras/compile.py, train.py --compile): its first step, which compiles, is reported apart from
the steady-state steps. A fourth rotates our model first (online Hadamard on the down_proj input,
R4) and reports what share of the step it costs.

    python bench/bench_train.py                          # CPU fp32, batch 4 x 256
    python bench/bench_train.py --shape llama2-7b --dtype bfloat16 --batch 8 --seq 1024 --layers 32   # on a GPU
"""
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import MeasureConfig, run_worker  # noqa: E402  (bench/ is this script's folder)
import lora  # noqa: E402
import rotate  # noqa: E402
from data.options import one_line_errors, option, option_group, parse_config  # noqa: E402
from extras.compile import compile_blocks  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SHAPES = {
    "smollm2-135m": ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama2-7b": ModelConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                             max_position_embeddings=4096),
    "llama2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, head_dim=128, vocab_size=32000,
                              max_position_embeddings=4096),
    # LLaMA-3-8B's shapes with LLaMA-3.1's rope scaling (positions only: no size or FLOP changes)
    "llama3-8b": ModelConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                             rope_theta=500000.0, max_position_embeddings=131072,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@dataclass
class BenchTrainConfig:
    shape: str = option("smollm2-135m", "model shape (random weights)", choices=tuple(sorted(SHAPES)))
    layers: int | None = option(None, "override the number of layers (0 or none: the shape's own)", at_least=1,
                                zero_means_all=True)
    measure: MeasureConfig = option_group(MeasureConfig, "what is timed (per training step)")
    impl: str | None = option(None, "internal: measure this implementation only and print its JSON (how "
                              "the script re-invokes itself in a subprocess)", choices=("ours", "ours+compile", "ours+rotate", "peft"))


def build(impl: str, config: ModelConfig, dtype, device):
    torch.manual_seed(0)
    ours = Transformer(config).to(dtype)
    if impl in ("ours", "ours+compile", "ours+rotate"):
        record = None
        if impl == "ours+rotate":
            record = rotate.rotate_model(ours, seed=0)
        torch.manual_seed(1)
        lora.add_lora(ours, ("q_proj", "v_proj"), rank=16, alpha=16)
        lora.mark_only_lora_trainable(ours)
        ours.to(device)
        if impl == "ours+compile":  # as train.py --compile: after the adapters
            compile_blocks(ours)
        return ours, (lambda idx: ours(idx)), record
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).to(dtype)
    hf.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                        for k, v in ours.state_dict().items()}, strict=False)
    del ours
    torch.manual_seed(1)
    peft_model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    peft_model.to(device)
    return peft_model, (lambda idx: peft_model(input_ids=idx).logits), None


def peak_memory_mib(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    torch.set_num_threads(args.measure.threads)
    config = SHAPES[args.shape]
    if args.layers:
        config.num_hidden_layers = args.layers
    dtype = getattr(torch, args.measure.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, run, _ = build(args.impl, config, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    idx = torch.randint(0, config.vocab_size, (args.measure.batch, args.measure.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        loss = torch.nn.functional.cross_entropy(run(idx).float().flatten(0, 1)[:-1], idx.flatten()[1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    step()  # warm-up (and the optimizer state); for ours+compile, the compile
    if device == "cuda":
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.measure.iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / args.measure.iters
    result = {"tok_s": args.measure.batch * args.measure.seq / seconds, "step_s": seconds, "first_step_s": first_step_s,
              "peak_mib": peak_memory_mib(device), "trainable": sum(p.numel() for p in params)}
    if args.impl == "ours+rotate":  # time the online Hadamard alone, forward + backward, on its real input size
        x = torch.randn(args.measure.batch, args.measure.seq, config.intermediate_size, dtype=dtype, device=device, requires_grad=True)
        t = time.perf_counter()
        for _ in range(args.measure.iters):
            rotate.walsh_hadamard_transform(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        result["hadamard_s_per_step"] = (time.perf_counter() - t) / args.measure.iters * config.num_hidden_layers
    print(json.dumps(result))


def main(argv=None):
    args = parse_config(BenchTrainConfig(), argv, prog="bench_train.py", description=__doc__)
    if args.impl:
        return worker(args)

    results = {impl: run_worker(__file__, impl, argv) for impl in ("ours", "ours+compile", "peft", "ours+rotate")}
    ours, compiled, peft, rot = results["ours"], results["ours+compile"], results["peft"], results["ours+rotate"]
    print(f"LoRA r=16 on q_proj,v_proj, {args.shape} shape, {args.measure.dtype}, batch {args.measure.batch} x {args.measure.seq}, "
          f"{args.measure.threads} threads, {args.measure.iters} steps")
    print(f"{'':<22}{'ours':>12}{'ours compiled':>15}{'transformers+peft':>20}{'ratio':>8}{'ratio compiled':>16}")
    print(f"{'train tokens/s':<22}{ours['tok_s']:>12.1f}{compiled['tok_s']:>15.1f}{peft['tok_s']:>20.1f}"
          f"{ours['tok_s'] / peft['tok_s']:>8.2f}{compiled['tok_s'] / peft['tok_s']:>16.2f}")
    print(f"{'peak memory MiB':<22}{ours['peak_mib']:>12.1f}{compiled['peak_mib']:>15.1f}{peft['peak_mib']:>20.1f}"
          f"{peft['peak_mib'] / ours['peak_mib']:>8.2f}{peft['peak_mib'] / compiled['peak_mib']:>16.2f}")
    print(f"{'trainable params':<22}{ours['trainable']:>12}{compiled['trainable']:>15}{peft['trainable']:>20}")
    print("ratio > 1: ours faster / smaller.")
    saved = ours["step_s"] - compiled["step_s"]
    print(f"compiled: first step {compiled['first_step_s']:.1f} s (it compiles; eager's first step: "
          f"{ours['first_step_s']:.1f} s), then {compiled['step_s']:.2f} s a step against {ours['step_s']:.2f} s eager"
          + (f": the compile pays for itself after {(compiled['first_step_s'] - ours['first_step_s']) / saved:.0f} steps"
             if saved > 0 else ": no faster, the compile never pays for itself"))
    share = rot["hadamard_s_per_step"] / rot["step_s"]
    print(f"rotated (R4 online Hadamard): {rot['tok_s']:.1f} tokens/s ({rot['tok_s'] / ours['tok_s']:.2f}x "
          f"unrotated); the Hadamard alone (fwd+bwd, all layers) is {100 * share:.1f}% of the step")


if __name__ == "__main__":
    with one_line_errors("bench/bench_train.py"):
        main()
