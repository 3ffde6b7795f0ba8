"""extras.hf_export.export_plain_llama: a rotated, LoRA-trained, merged model written as a plain LLaMA checkpoint
that Hugging Face transformers runs unchanged (R4's online Hadamard folded back into down_proj)."""
import pytest
import torch
import torch.nn.functional as F

import lora
import quant
import rotate
from extras.hf_export import export_plain_llama
from helpers import tiny_model
from model import load_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")


def hf_logits(path, idx):
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


def rotated_trained_merged(seed=0, **config):
    """A tiny model rotated (R1, R4, R2, R3), LoRA-trained a few steps on all seven linears, merged."""
    model = tiny_model(seed=seed, **config)
    rotate.rotate_model(model, seed=seed, rotate_ov=True, rotate_qk=True)  # R3 cancels in q.k: the export drops it
    lora.add_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), rank=4, alpha=8)
    lora.mark_only_lora_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(step))
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return lora.merge_lora(model).eval()


@pytest.mark.parametrize("config", [dict(), dict(intermediate_size=172), dict(tie_word_embeddings=True)],
                         ids=["exact-hadamards", "fallback-172", "tied"])
def test_transformers_runs_the_export_and_gets_our_logits(tmp_path, config):
    model = rotated_trained_merged(**config)
    idx = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = model(idx)
    export_plain_llama(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "rotation.json").exists()  # a plain checkpoint
    difference = (hf_logits(tmp_path / "hf", idx) - ours).abs().max().item()
    print(f"\n{config}: max |transformers - ours| = {difference:.2e}")
    assert difference < 1e-4
    with torch.no_grad():  # and through our own plain loader
        assert (load_checkpoint(tmp_path / "hf")(idx) - ours).abs().max() < 1e-4
    # the model itself is untouched: it still runs its online Hadamard
    assert isinstance(model.layers[0].mlp.down_input_transform, rotate.OnlineHadamard)
    # without the folding, transformers would compute another function
    save_checkpoint(model, tmp_path / "unfolded")
    assert (hf_logits(tmp_path / "unfolded", idx) - ours).abs().max() > 1e-2


def test_export_refuses_adapters_and_quantizers(tmp_path):
    model = tiny_model()
    rotate.rotate_model(model)
    lora.add_lora(model)
    with pytest.raises(ValueError, match="LoRALinear.*merge the adapters"):
        export_plain_llama(model, tmp_path / "a")
    quantized = quant.quantize_model(lora.merge_lora(model), w_bits=4, a_bits=4, w_clip_search=False)
    with pytest.raises(ValueError, match="QuantLinear"):
        export_plain_llama(quantized, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.mark.slow
def test_stories260k_rotated_export_runs_in_transformers(tmp_path, stories_model):
    """A real checkpoint, whose intermediate size 172 takes the random-orthogonal fallback factor."""
    import copy
    model = copy.deepcopy(stories_model)
    rotate.rotate_model(model, seed=3)
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, original = model(idx), stories_model(idx)
    export_plain_llama(model, tmp_path / "hf")
    theirs = hf_logits(tmp_path / "hf", idx)
    print(f"\nstories260K: max |transformers - ours| = {(theirs - ours).abs().max().item():.2e}, "
          f"|transformers - original| = {(theirs - original).abs().max().item():.2e}")
    assert (theirs - ours).abs().max() < 1e-4 and (theirs - original).abs().max() < 1e-4


@pytest.mark.slow
def test_train_export_hf_writes_a_checkpoint_transformers_and_our_loader_read(tmp_path, stories_dir):
    import train
    from eval import load_model
    from data.options import replace_options
    cfg = replace_options(train.TrainConfig(), model="stories260K", data="tinystories", out=str(tmp_path / "run"),
                          max_steps=4, batch_size=4, seq_len=64, rotate=True, w_bits=16, a_bits=16, tasks="",
                          ppl_windows=1, ppl_seq_len=64, val_examples=8, export_hf=True)
    train.run(cfg)
    merged, _, _ = load_model(tmp_path / "run" / "merged")
    hf_dir = tmp_path / "run" / "hf"
    assert (hf_dir / "tokenizer.model").is_file() and not (hf_dir / "rotation.json").exists()
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf_logits(hf_dir, idx) - merged(idx)).abs().max() < 1e-4
