"""What goes beyond the RoLoRA and ResLoRA papers, one feature a file, each one a student can skip.

Each file sits just above the stages it uses, and the scripts call it only when its flag is on:
    spinquant.py             learned R1 and R2 (SpinQuant): train.py --rotate --rotation learned
    distributed.py           DDP and FSDP2 under torchrun: train.py --fsdp
    compile.py               torch.compile, block by block: train.py / eval.py --compile
    checkpoints.py           a training run's checkpoints, --resume, and the lock on its --out
    quantized_checkpoint.py  a quantized model as integer codes (OUT/quantized), reloaded without calibration
    int_kernels.py           a quantized model's linears on int8 matrix products: --int-kernels
    hf_export.py             a rotated model as a plain LLaMA for transformers (train.py --export-hf)
    harness.py               lm-evaluation-harness's model interface over eval.py's scorer
    sample.py                text from any checkpoint the project writes: python extras/sample.py --model DIR
"""
