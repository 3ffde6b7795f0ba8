"""Tests of data/models/prepare.py: the llama2.c and GGUF conversions and the tokenizers they write.

    python -m pytest tests/test_prepare.py -x -q               # everything (real checkpoints too)
    python -m pytest tests/test_prepare.py -x -q -m "not slow" # synthetic files only
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data.models import prepare
from helpers import ROOT
from data.tokenizer import Tokenizer

STORIES_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
                "the park. One day, she saw a big, red ball. She wanted to play with it, but it was "
                "too high")


def mirror_file(relative: str):
    root = os.environ.get("ROLORA_MIRROR")
    if not root or not (ROOT / root / relative).is_file():
        pytest.skip(f"needs ROLORA_MIRROR with {relative}")
    return ROOT / root / relative


# -----------------------------------------------------------------------------
# the rotary permutation

def rotate_interleaved(x, pos, base=10000.0):
    """Meta / llama2.c rotary: rows (2i, 2i+1) of each head form a complex number."""
    hs = x.shape[-1]
    angle = pos * base ** (-torch.arange(0, hs, 2, dtype=x.dtype) / hs)  # (hs/2,)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], hs // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)


def rotate_half_style(x, pos, base=10000.0):
    """Hugging Face rotary: rows (i, i + hs/2) are rotated together."""
    hs = x.shape[-1]
    angle = pos * base ** (-torch.arange(0, hs, 2, dtype=x.dtype) / hs)
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_permuted_qk_give_the_same_attention_scores():
    torch.manual_seed(0)
    n_heads, n_kv_heads, hs, dim = 4, 2, 16, 64
    wq = torch.randn(n_heads * hs, dim, dtype=torch.float64)
    wk = torch.randn(n_kv_heads * hs, dim, dtype=torch.float64)
    x_m, x_n, m, n = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64), 7, 3
    q_meta = rotate_interleaved((wq @ x_m).view(n_heads, hs), m)
    k_meta = rotate_interleaved((wk @ x_n).view(n_kv_heads, hs), n)
    wq_hf = prepare.interleaved_to_rotate_half(wq, n_heads)
    wk_hf = prepare.interleaved_to_rotate_half(wk, n_kv_heads)
    q_hf = rotate_half_style((wq_hf @ x_m).view(n_heads, hs), m)
    k_hf = rotate_half_style((wk_hf @ x_n).view(n_kv_heads, hs), n)
    group = n_heads // n_kv_heads  # query head h reads kv head h // group
    scores_meta = (q_meta * k_meta.repeat_interleave(group, 0)).sum(-1)
    scores_hf = (q_hf * k_hf.repeat_interleave(group, 0)).sum(-1)
    assert torch.allclose(scores_meta, scores_hf, atol=1e-9)
    # the unpermuted weights in a rotate-half model would not give these scores
    q_wrong = rotate_half_style((wq @ x_m).view(n_heads, hs), m)
    assert not torch.allclose((q_wrong * k_hf.repeat_interleave(group, 0)).sum(-1), scores_meta)


# -----------------------------------------------------------------------------
# llama2.c .bin (synthetic)

def write_llama2c_bin(path, dim=16, hidden=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab=32,
                      seq_len=8, shared=True, seed=0):
    """A random llama2.c legacy checkpoint; returns its tensors by llama2.c name."""
    rng = np.random.default_rng(seed)
    hs, kv = dim // n_heads, n_kv_heads * dim // n_heads
    shapes = [("token_embedding", (vocab, dim)), ("rms_att", (n_layers, dim)),
              ("wq", (n_layers, dim, dim)), ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)),
              ("wo", (n_layers, dim, dim)), ("rms_ffn", (n_layers, dim)),
              ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_cis_real", (seq_len, hs // 2)), ("freq_cis_imag", (seq_len, hs // 2))]
    shapes += [] if shared else [("wcls", (vocab, dim))]
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    header = [dim, hidden, n_layers, n_heads, n_kv_heads, vocab if shared else -vocab, seq_len]
    with open(path, "wb") as f:
        f.write(np.array(header, dtype="<i4").tobytes())
        for name, _ in shapes:
            f.write(tensors[name].astype("<f4").tobytes())
    return {k: torch.from_numpy(v) for k, v in tensors.items()}


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_tensors_land_under_their_hf_names(tmp_path, shared):
    w = write_llama2c_bin(tmp_path / "m.bin", shared=shared)
    config, sd = prepare.convert_llama2c(tmp_path / "m.bin")
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (16, 24, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (32, 8)
    assert config["tie_word_embeddings"] is shared and ("lm_head.weight" in sd) is (not shared)
    assert torch.equal(sd["model.embed_tokens.weight"], w["token_embedding"])
    assert torch.equal(sd["model.norm.weight"], w["rms_final"])
    if not shared:
        assert torch.equal(sd["lm_head.weight"], w["wcls"])
    for i in range(2):
        layer = f"model.layers.{i}."
        assert torch.equal(sd[layer + "input_layernorm.weight"], w["rms_att"][i])
        assert torch.equal(sd[layer + "post_attention_layernorm.weight"], w["rms_ffn"][i])
        permute = prepare.interleaved_to_rotate_half
        assert torch.equal(sd[layer + "self_attn.q_proj.weight"], permute(w["wq"][i], 4))
        assert torch.equal(sd[layer + "self_attn.k_proj.weight"], permute(w["wk"][i], 2))
        assert torch.equal(sd[layer + "self_attn.v_proj.weight"], w["wv"][i])
        assert torch.equal(sd[layer + "self_attn.o_proj.weight"], w["wo"][i])
        assert torch.equal(sd[layer + "mlp.gate_proj.weight"], w["w1"][i])
        assert torch.equal(sd[layer + "mlp.up_proj.weight"], w["w3"][i])
        assert torch.equal(sd[layer + "mlp.down_proj.weight"], w["w2"][i])
    assert len(sd) == 2 + 9 * 2 + (0 if shared else 1)


def test_truncated_llama2c_bin_is_an_error_naming_the_file(tmp_path):
    write_llama2c_bin(tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="cut.bin.*truncated"):
        prepare.convert_llama2c(tmp_path / "cut.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(ValueError, match="tiny.bin"):
        prepare.convert_llama2c(tmp_path / "tiny.bin")


def test_unknown_name_lists_the_names(tmp_path):
    with pytest.raises(ValueError) as err:
        prepare.prepare_model("llama-7b", tmp_path / "x")
    assert all(name in str(err.value) for name in prepare.NAMES)


def test_interrupted_write_leaves_nothing_that_looks_ready(tmp_path):
    out = tmp_path / "model"
    sd = {"w": torch.zeros(2)}
    with pytest.raises(FileNotFoundError):  # the last file cannot be copied: fails after the weights
        prepare.write_checkpoint_dir(out, {"a": 1}, sd, {"tokenizer.model": tmp_path / "missing"})
    assert not out.exists() and list(tmp_path.iterdir()) == []
    prepare.write_checkpoint_dir(out, {"a": 1}, sd, {"notes.txt": "hi"})
    assert prepare.is_ready(out) and (out / "notes.txt").read_text() == "hi"


# -----------------------------------------------------------------------------
# GGUF (synthetic, written with the gguf package)

def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py's `permute`: rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_byte_chars():
    """GPT-2's bytes_to_unicode: the printable stand-in character of every byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path, hidden=64, inter=96, n_layers=2, n_heads=4, n_kv_heads=2, seed=0):
    """A random 2-layer LLaMA GGUF with a byte-level BPE vocabulary.

    Returns the HF tensors the conversion must recover, and the token list."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + gpt2_byte_chars() + ["Ġt", "he", "Ġthe", "20"]
    merges = ["Ġ t", "h e", "Ġt he", "2 0"]  # "2 0" exists to show that digits are never merged
    hs = hidden // n_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", n_layers), ("context_length", 128), ("embedding_length", hidden),
                       ("feed_forward_length", inter), ("attention.head_count", n_heads),
                       ("attention.head_count_kv", n_kv_heads), ("vocab_size", len(tokens))]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 100000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    control, normal = 3, 1  # llama.cpp token types
    writer.add_array("tokenizer.ggml.token_type",
                     [control] * len(specials) + [normal] * (len(tokens) - len(specials)))
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")

    expected = {}

    def add(gguf_name, hf_name, shape, qtype=Q.F32, n_permute_heads=None):
        w = rng.standard_normal(shape).astype(np.float32)
        stored = llamacpp_permute(w, n_permute_heads) if n_permute_heads else w
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored)
            expected[hf_name] = w
        else:  # quantizing commutes with the row permutation: blocks run along a row
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), hidden), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", (hidden,))
    for i in range(n_layers):
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        qtype = Q.Q4_1 if i == 0 else Q.F32  # both paths through the un-permutation
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", (hidden,))
        add(blk + "attn_q.weight", hf + "self_attn.q_proj.weight", (n_heads * hs, hidden), qtype, n_heads)
        add(blk + "attn_k.weight", hf + "self_attn.k_proj.weight", (n_kv_heads * hs, hidden), qtype,
            n_kv_heads)
        add(blk + "attn_v.weight", hf + "self_attn.v_proj.weight", (n_kv_heads * hs, hidden), qtype)
        add(blk + "attn_output.weight", hf + "self_attn.o_proj.weight", (hidden, hidden), qtype)
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,))
        add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (inter, hidden), qtype)
        add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (inter, hidden), qtype)
        add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, inter), Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, tokens


def test_gguf_conversion_recovers_hf_weights_and_config(tmp_path):
    expected, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    gguf = pytest.importorskip("gguf")
    config, sd = prepare.convert_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    assert sorted(sd) == sorted(expected)  # tied: no lm_head.weight
    for name, w in expected.items():
        assert sd[name].dtype == torch.float32 and tuple(sd[name].shape) == w.shape, name
        assert torch.equal(sd[name], torch.from_numpy(np.asarray(w))), name
    assert config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)  # not fp32 noise
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (1, 2, 128)
    assert "dequantized" in config["_source"].lower()


def test_own_dequantizers_match_gguf_package():
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32) * 3
    for qtype, ours in [(Q.Q4_1, prepare.dequantize_q4_1), (Q.Q8_0, prepare.dequantize_q8_0)]:
        raw = gguf.quants.quantize(x, qtype)
        reference = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(ours(raw).reshape(reference.shape), reference), qtype.name
        # and a real round trip: within one 4-bit step of the data's range
        assert np.abs(reference - x).max() < (x.max() - x.min()) / 15


def test_gguf_tokenizer_json_is_byte_level_with_single_digits(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    _, tokens = write_tiny_gguf(tmp_path / "tiny.gguf")
    gguf = pytest.importorskip("gguf")
    files = prepare.gguf_tokenizer_files(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer(tmp_path)
    text = "the 2024 Héllo\n\t  東京 🙂"
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode(" 2024", bos=False)] == [" ", "2", "0", "2", "4"]
    assert tok.encode(" the", bos=False) == [tokens.index("Ġthe")]  # the merges are applied
    assert tok.encode("é", bos=False) == [tokens.index(c) for c in "Ã©"]  # UTF-8 bytes as GPT-2 chars
    ids = tok.encode("<|im_start|>x<|im_end|>", bos=False)
    assert ids[::2] == [1, 2]  # specials are single ids...
    raw = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
    assert raw.decode(ids, skip_special_tokens=True) == "x"  # ...marked special
    config = json.loads(files["tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["chat_template"] == "{{ messages }}"


# -----------------------------------------------------------------------------
# the real checkpoints (slow)

@pytest.mark.slow
def test_prepare_stories_into_a_fresh_dir_is_ready_and_idempotent(tmp_path):
    mirror_file(prepare.STORIES_BIN)
    out = prepare.prepare_model("stories260K", tmp_path / "stories")
    assert prepare.is_ready(out) and (out / "tokenizer.model").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["stories"]  # no temporary folder left behind
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare.prepare_model("stories260K", out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not written again


@pytest.mark.slow
def test_stories260K_greedy_text(stories_dir, stories_model):
    tok = Tokenizer(stories_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 512)
    out = stories_model.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=60, temperature=0.0)
    assert tok.decode(out[0, 1:].tolist()) == STORIES_TEXT


@pytest.mark.slow
def test_smollm2_answers_paris(smollm_dir, smollm_model):
    tok = Tokenizer(smollm_dir)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    idx = torch.tensor([tok.encode(prompt, bos=False)])
    out = smollm_model.generate(idx, max_new_tokens=10, temperature=0.0, eos_id=tok.eos_id)
    assert "Paris" in tok.decode(out[0, idx.shape[1]:].tolist())


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_and_splits_digits(smollm_dir):
    tok = Tokenizer(smollm_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    text = "Héllo wörld 12345  ünïcödé — 東京 🙂\n\n\tend"
    assert tok.decode(tok.encode(text, bos=False)) == text
    assert [tok.decode([i]) for i in tok.encode("year 12345", bos=False)][-5:] == list("12345")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", bos=False)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]  # specials parse as single ids


@pytest.mark.slow
def test_llama2_tokenizer_of_the_mirror_loads(tmp_path):
    shutil.copyfile(mirror_file("tokenizers/llama2/tokenizer.model"), tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    ids = tok.encode("Hello world, 2024!", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids[1:-1]) == "Hello world, 2024!"
