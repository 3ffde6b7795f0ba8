"""torch.compile, block by block: train.py and eval.py --compile.

Beyond the paper, and off by default: on a CPU the compile time outweighs what it saves
(bench/README.md, Benchmarks).
"""
import torch
import torch._dynamo
import torch._inductor.config
import torch.fx.experimental._config

from model import Transformer


def compile_blocks(model: Transformer) -> Transformer:
    """torch.compile every block of `model`, in place, and return the model (train.py and eval.py
    --compile). Whatever the stages put in a block is compiled with it: adapters, quantizers, the
    online Hadamard (a custom op of rotate.py's, which the compiler does not trace into).

    Per block rather than the whole model ("regional compilation"): the blocks share one compiled
    graph, their weights being its inputs, so compiling costs about one block's time whatever the
    depth. In place (Module.compile): parameter names, state_dict, adapters, merging and checkpoints
    stay as they are. A deepcopy is eager again (Module.__getstate__ drops the compiled call):
    compile a copy separately. dynamic=True: batches are right-padded to a length that changes from
    batch to batch, and a symbolic length gives one graph for all of them, not one per length.
    Forwards with a KV cache run eagerly (Transformer.forward)."""
    # The blocks of every model of a run share the graphs of Block.forward: one per kind of block
    # (plain, LoRA, merged, quantized) x training or not x grad or not x batch of one or more.
    # Past the default limit of 8 the compiler gives up and runs the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Without this, sizes equal in the first batch share one symbol: a length that happens to equal
    # head_dim (cos is (T, head_dim)) is specialised with it, and the next length compiles again.
    torch.fx.experimental._config.use_duck_shape = False
    # Dropout draws its masks from torch's generator as eager does, not from the compiler's own
    # random numbers: a compiled run draws the masks an eager one would
    torch._inductor.config.fallback_random = True
    for block in model.layers:
        block.compile(dynamic=True)
    return model
