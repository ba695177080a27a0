"""Checkpoint conversion, checked against HF transformers' LlamaForCausalLM and llama2.c's reference output."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

from lit_adapter.checkpoint import load_checkpoint_dir, load_state_dict
from lit_adapter.model.config import Config
from lit_adapter.convert import (
    convert_hf_checkpoint,
    convert_llama2c_checkpoint,
    convert_meta_checkpoint,
    lit_to_hf_state_dict,
)
from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT
from lit_adapter.data.tokenizer import llama2c_vocab_to_sentencepiece

REPO = Path(__file__).resolve().parents[1]
# karpathy/llama2.c test_all.py: stories260K, greedy from BOS (quoted in ../shared/data/README.md)
STORIES260K_REFERENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said,"
)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------------------
# Independent writers of the foreign formats (deliberately not using lit_adapter.convert)

_LAYER_TO_META = {
    "norm_1": "attention_norm", "norm_2": "ffn_norm", "attn.q_proj": "attention.wq", "attn.k_proj": "attention.wk",
    "attn.v_proj": "attention.wv", "attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
}
_TOP_TO_META = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
                "lm_head.weight": "output.weight"}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows (i, i + hs/2) of each head become Meta's interleaved rows (2i, 2i + 1)."""
    hs = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for i in range(hs // 2):
            out[h * hs + 2 * i] = w[h * hs + i]
            out[h * hs + 2 * i + 1] = w[h * hs + hs // 2 + i]
    return out


def lit_to_meta(state_dict: Dict[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    out = {}
    for name, w in state_dict.items():
        if name in _TOP_TO_META:
            out[_TOP_TO_META[name]] = w.clone()
            continue
        _, _, layer, *rest = name.split(".")
        module = ".".join(rest[:-1])
        if module == "attn.q_proj":
            w = to_interleaved(w, config.n_head)
        elif module == "attn.k_proj":
            w = to_interleaved(w, config.n_query_groups)
        out[f"layers.{layer}.{_LAYER_TO_META[module]}.weight"] = w.clone()
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def write_llama2c_bin(path: Path, model: GPT, version: int) -> None:
    """A llama2.c export (export.py's legacy_export / version1_export layout)."""
    c = model.config
    meta = lit_to_meta(model.state_dict(), c)
    layers = range(c.n_layer)
    per_layer = lambda stem: [meta[f"layers.{i}.{stem}.weight"] for i in layers]  # noqa: E731
    matrices = [w for stem in ("wq", "wk", "wv", "wo") for w in per_layer(f"attention.{stem}")]
    ffn = per_layer("feed_forward.w1") + per_layer("feed_forward.w2") + per_layer("feed_forward.w3")
    dims = (c.n_embd, c.intermediate_size, c.n_layer, c.n_head, c.n_query_groups)
    if version == 0:
        vocab = c.vocab_size if c.tie_embeddings else -c.vocab_size  # negative: a classifier is stored last
        header = struct.pack("<7i", *dims, vocab, c.block_size)
        freqs = torch.randn(2, c.block_size, c.head_size // 2)  # rotary tables the converter must skip
        tensors = [meta["tok_embeddings.weight"], *per_layer("attention_norm"), *matrices, *per_layer("ffn_norm"),
                   *ffn, meta["norm.weight"], freqs[0], freqs[1]]
    else:
        header = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, c.vocab_size, c.block_size, int(c.tie_embeddings))
        header += b"\0" * (256 - len(header))
        tensors = [*per_layer("attention_norm"), *per_layer("ffn_norm"), meta["norm.weight"],
                   meta["tok_embeddings.weight"], *matrices, *ffn]
    if not c.tie_embeddings:
        tensors.append(meta["output.weight"])
    path.write_bytes(header + b"".join(t.detach().float().contiguous().numpy().tobytes() for t in tensors))


def random_model(name: str, **overrides) -> GPT:
    model = GPT(Config.from_name(name, **overrides))
    model.init_weights(std=0.2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_f" in n:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a misplaced norm shows
    return model.eval()


def hf_model(gqa: bool, tied: bool, vocab_size: int = 512, rope_theta: float = 10000.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=rope_theta,
        tie_word_embeddings=tied, initializer_range=0.2, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tok512_model(shared_data, tmp_path_factory) -> Path:
    """The stories260K vocabulary as a SentencePiece tokenizer.model (512 tokens, fits the tiny configs)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(llama2c_vocab_to_sentencepiece(shared_data / "checkpoints" / "stories260K" / "tok512.bin"))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# HF transformers


@pytest.mark.parametrize(
    "gqa, tied, save_kwargs",
    [
        (False, False, dict(safe_serialization=True)),
        (True, True, dict(safe_serialization=True, max_shard_size="20KB")),
        (True, False, dict(safe_serialization=False)),
        (False, True, dict(safe_serialization=True)),
    ],
    ids=["mha-untied-safetensors", "gqa-tied-sharded", "gqa-untied-bin", "mha-tied-rope500k"],
)
def test_hf_conversion_matches_hf_logits(tmp_path, tok512_model, gqa, tied, save_kwargs):
    rope_theta = 500000.0 if not gqa and tied else 10000.0
    hf = hf_model(gqa, tied, rope_theta=rope_theta)
    hf_dir = tmp_path / "hf"
    if save_kwargs.get("safe_serialization", True):
        hf.save_pretrained(hf_dir, **save_kwargs)
    else:
        # transformers 5 only writes safetensors; older versions (and many Hub repos) have pytorch_model.bin, a
        # torch.save'd state dict
        hf.config.save_pretrained(hf_dir)
        torch.save(hf.state_dict(), hf_dir / "pytorch_model.bin")
    (hf_dir / "tokenizer.model").write_bytes(tok512_model.read_bytes())
    if "max_shard_size" in save_kwargs:
        assert len(list(hf_dir.glob("model-*.safetensors"))) > 1 and (hf_dir / "model.safetensors.index.json").exists()

    config = convert_hf_checkpoint(hf_dir, tmp_path / "out")
    assert (config.n_query_groups, config.tie_embeddings, config.rope_base) == (2 if gqa else 4, tied, rope_theta)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tok512_model.read_bytes()
    _, model, tokenizer = load_checkpoint_dir(tmp_path / "out")
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    idx = torch.cat([tokenizer.encode("Once upon a time, there was a little girl."), torch.randint(0, 512, (20,))])
    idx = torch.stack([idx, idx.flip(0)])  # (2, T)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert rel_error(ours, theirs) < 1e-5


def test_hf_conversion_casts_dtype(tmp_path, tok512_model):
    hf = hf_model(gqa=True, tied=False)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", tokenizer_path=tok512_model)
    weights = load_state_dict(tmp_path / "out" / "lit_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    expected = hf.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(weights["transformer.h.1.mlp.down_proj.weight"], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Meta consolidated.*.pth


def test_meta_shards_match_hf_logits(tmp_path, tok512_model):
    hf = hf_model(gqa=True, tied=False)
    from lit_adapter.convert import hf_to_lit_state_dict

    config = Config.from_name("tiny-gqa")
    meta = lit_to_meta(hf_to_lit_state_dict(hf.state_dict()), config)
    # Meta's tensor parallelism: column-parallel layers split their rows, row-parallel ones (and the parallel
    # embedding) their columns; the norms are replicated.
    row_split = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
    col_split = ("attention.wo", "feed_forward.w2", "tok_embeddings")
    shards = [{}, {}]
    for name, w in meta.items():
        stem = name.removesuffix(".weight")
        stem = stem.split(".", 2)[-1] if stem.startswith("layers.") else stem
        if stem in row_split:
            parts = w.chunk(2, dim=0)
        elif stem in col_split:
            parts = w.chunk(2, dim=1)
        else:
            parts = (w, w)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    shards[0]["rope.freqs"] = shards[1]["rope.freqs"] = torch.randn(4)  # stored by Meta, not used
    meta_dir = tmp_path / "llama" / "tiny"
    meta_dir.mkdir(parents=True)
    for i, shard in enumerate(shards):
        torch.save(shard, meta_dir / f"consolidated.0{i}.pth")
    params = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=8, norm_eps=1e-5)
    (meta_dir / "params.json").write_text(json.dumps(params))
    (tmp_path / "llama" / "tokenizer.model").write_bytes(tok512_model.read_bytes())  # Meta keeps it one level up

    config = convert_meta_checkpoint(meta_dir, tmp_path / "out", model_name="tiny-gqa")
    assert config == Config.from_name("tiny-gqa", norm_eps=1e-5)
    _, model, _ = load_checkpoint_dir(tmp_path / "out")
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert rel_error(model(idx), hf(idx).logits) < 1e-5

    with pytest.raises(UserError, match=r"does not match --model_name tiny: n_query_groups=2 vs 4"):
        convert_meta_checkpoint(meta_dir, tmp_path / "bad", model_name="tiny")


# ---------------------------------------------------------------------------------------------------------------------
# llama2.c


@pytest.fixture(scope="module")
def stories260k(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260K")
    folder = shared_data / "checkpoints" / "stories260K"
    config = convert_llama2c_checkpoint(folder / "stories260K.bin", out, tokenizer_path=folder / "tok512.bin")
    assert config == Config.from_name("stories260K")
    return load_checkpoint_dir(out)


def test_stories260k_logits_match_hf(stories260k):
    from transformers import LlamaConfig, LlamaForCausalLM

    config, model, tokenizer = stories260k
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=True, attn_implementation="eager",
        )
    ).eval()
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()))
    idx = tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")[None]
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert rel_error(ours, theirs) < 1e-5
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()

    ids = greedy(model, [tokenizer.bos_id], 80)
    hf_ids = hf.generate(torch.tensor([[tokenizer.bos_id]]), do_sample=False, max_new_tokens=80, pad_token_id=0)
    assert hf_ids[0].tolist() == ids


def greedy(model: GPT, prompt, n_new: int):
    """Argmax decoding with the KV cache: the prompt in one step, then one token per step."""
    model.set_kv_cache(batch_size=1)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            ids = list(prompt) + [int(logits[0, -1].argmax())]
            for _ in range(n_new - 1):
                pos = torch.tensor([len(ids) - 1])
                ids.append(int(model(torch.tensor([[ids[-1]]]), input_pos=pos)[0, -1].argmax()))
    finally:
        model.clear_kv_cache()
    return ids


def test_stories260k_greedy_reproduces_llama2c_reference(stories260k):
    _, model, tokenizer = stories260k
    ids = greedy(model, [tokenizer.bos_id], 80)
    assert tokenizer.decode(ids).startswith(STORIES260K_REFERENCE)
    # without the cache: the same tokens from full forward passes
    with torch.no_grad():
        assert model(torch.tensor([ids]))[0, :-1].argmax(-1).tolist() == ids[1:]

    prompt = tokenizer.encode("Once upon a time").tolist()
    assert prompt == ids[: len(prompt)]  # the prompt tokenizes exactly as the model generated it
    continued = greedy(model, prompt, 60)
    assert tokenizer.decode(continued).startswith(STORIES260K_REFERENCE[:150])
    assert continued == ids[: len(continued)]


@pytest.mark.parametrize("fmt", ["pt", "bin-v0-untied", "bin-v0-tied", "bin-v1-untied", "bin-v1-tied"])
def test_llama2c_round_trip(tmp_path, shared_data, fmt):
    tied = fmt.endswith("-tied") or fmt == "pt"
    source = random_model("tiny-gqa", tie_embeddings=tied)
    path = tmp_path / f"model.{fmt.split('-')[0]}"
    c = source.config
    if fmt == "pt":
        model_args = dict(dim=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head, n_kv_heads=c.n_query_groups,
                          vocab_size=c.vocab_size, hidden_dim=None, multiple_of=8, norm_eps=1e-5,
                          max_seq_len=c.block_size, dropout=0.0)
        state = {f"_orig_mod.{k}": v for k, v in lit_to_meta(source.state_dict(), c).items()}  # torch.compile'd
        torch.save({"model_args": model_args, "model": state, "iter_num": 10, "best_val_loss": torch.tensor(1.5)}, path)
    else:
        write_llama2c_bin(path, source, version=int(fmt.split("-")[1][1]))
    tokenizer_path = shared_data / "checkpoints" / "stories260K" / "tok512.bin"
    config = convert_llama2c_checkpoint(path, tmp_path / "out", tokenizer_path=tokenizer_path)
    assert config.tie_embeddings == tied
    assert (config.n_query_groups, config.intermediate_size, config.block_size) == (2, 88, 128)
    _, model, _ = load_checkpoint_dir(tmp_path / "out")
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert rel_error(model(idx), source(idx)) < 1e-6


def test_unsupported_hf_configs():
    base = dict(vocab_size=512, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4)
    from lit_adapter.convert import config_from_hf

    assert config_from_hf(dict(base, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})).rope_base == 5e5
    assert config_from_hf(dict(base, rope_theta=1e6, rope_scaling=None)).rope_base == 1e6
    linear = config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))  # tests/test_rope.py
    assert (linear.block_size, linear.original_block_size) == (4096, 2048)
    with pytest.raises(UserError, match="does not implement: rope_scaling=.*longrope"):
        config_from_hf(dict(base, rope_scaling={"rope_type": "longrope", "factor": 2.0}))
    with pytest.raises(UserError, match="does not implement: attention_bias=True"):
        config_from_hf(dict(base, attention_bias=True))
    with pytest.raises(UserError, match="unsupported architecture: config.json has model_type='mistral'"):
        config_from_hf(dict(base, model_type="mistral"))
    with pytest.raises(UserError, match="lacks the field 'intermediate_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})


# ---------------------------------------------------------------------------------------------------------------------
# Command-line errors: exit status 2, one "error:" line, no traceback


def test_scripts_report_user_errors(tmp_path, shared_data, tok512_model):
    hf = hf_model(gqa=False, tied=False)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tok512_model.read_bytes())
    edited = json.loads((tmp_path / "hf" / "config.json").read_text())
    edited["hidden_size"], edited["head_dim"] = 64, 16  # a consistent config, but the tensors are 32 wide
    (tmp_path / "hf" / "config.json").write_text(json.dumps(edited))

    lonely = tmp_path / "lonely"  # a llama2.c checkpoint without a tokenizer beside it
    lonely.mkdir()
    write_llama2c_bin(lonely / "model.bin", random_model("tiny"), version=0)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((lonely / "model.bin").read_bytes()[:-100])

    cases = {
        "hf-missing": (["convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "nope",
                        "--output_dir", tmp_path / "o1"], "checkpoint directory not found: " + str(tmp_path / "nope")),
        "hf-misfit": (["convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "hf",
                       "--output_dir", tmp_path / "o2"], "shape mismatches: transformer.wte.weight: checkpoint (512, 32) vs model (512, 64)"),
        "llama2c-no-tokenizer": (["convert_llama2c_checkpoint.py", "--checkpoint_path", lonely / "model.bin",
                                  "--output_dir", tmp_path / "o3"], "no tokenizer found"),
        "llama2c-truncated": (["convert_llama2c_checkpoint.py", "--checkpoint_path", truncated, "--output_dir",
                               tmp_path / "o4"], "implies"),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        key: subprocess.Popen([sys.executable, str(REPO / "scripts" / args[0]), *map(str, args[1:])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for key, (args, _) in cases.items()
    }
    # and one successful run, to check the script wiring itself
    folder = shared_data / "checkpoints" / "stories260K"
    ok = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "convert_llama2c_checkpoint.py"), "--checkpoint_path",
         str(folder / "stories260K.bin"), "--tokenizer_path", str(folder / "tok512.bin"), "--output_dir",
         str(tmp_path / "ok"), "--dtype", "bfloat16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    for key, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        expected = cases[key][1]
        assert proc.returncode == 2, (key, stderr)
        assert "Traceback" not in stderr, key
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (key, stderr)
        assert expected in lines[0], (key, lines[0])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing half-written
    stdout, stderr = ok.communicate(timeout=120)
    assert ok.returncode == 0, stderr
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "lit_model.safetensors", "model_config.json", "tokenizer.model"
    ]
    assert Config.from_checkpoint_dir(tmp_path / "ok") == Config.from_name("stories260K")
    assert load_state_dict(tmp_path / "ok" / "lit_model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16

    # the same errors in-process, for the cases not worth a subprocess each
    with pytest.raises(UserError, match="tokenizer not found: .*none.model"):
        convert_llama2c_checkpoint(lonely / "model.bin", tmp_path / "o5", tokenizer_path=tmp_path / "none.model")
    with pytest.raises(UserError, match="has no params.json"):
        convert_meta_checkpoint(lonely, tmp_path / "o6")
    with pytest.raises(UserError, match="the tokenizer .* has 32000 tokens but the model only 512"):
        convert_llama2c_checkpoint(lonely / "model.bin", tmp_path / "o7",
                                   tokenizer_path=shared_data / "tokenizers" / "llama" / "tokenizer.model")
    with pytest.raises(UserError, match="version-2 export"):
        v2 = tmp_path / "q80.bin"
        v2.write_bytes(struct.pack("<Ii7i", 0x616B3432, 2, 32, 88, 2, 4, 4, 512, 128) + bytes(400))
        convert_llama2c_checkpoint(v2, tmp_path / "o8")
