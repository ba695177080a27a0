"""Long context past the pretrained window (issue 12): packed plain text, LongLoRA's LoRA+ (exact parameter counts,
estimator against a measured step), and a RoPE-scaled run end to end on the real stories260K: no silent cap, the
scaling recorded and rebuilt by evaluation."""

import gzip
import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_adapter.model.config import Config
from lit_adapter.data.instructions import load_prepared
from lit_adapter.errors import UserError
from lit_adapter.memory import Cell, build_random_model, estimate_memory, measure_saved_activations, measure_step
from lit_adapter.memory import saved_activations
from lit_adapter.tuners.registry import MethodSpec, dry_run, load_finetuned, trainable_filter
from lit_adapter.data.text import prepare_text
from lit_adapter.tuners.adapter import AdapterConfig
from lit_adapter.tuners.lora import LoRAConfig

REPO = Path(__file__).resolve().parents[1]
LORA_PLUS = dict(train_embeddings=True, train_norms=True)
LINEAR2 = {"type": "linear", "factor": 2}


@pytest.fixture
def cli(capsys):
    """``python script args...`` in this process: ``(exit status, stdout, stderr)``."""

    def invoke(script, *args):
        capsys.readouterr()
        argv, sys.argv, code = sys.argv, [str(REPO / script), *map(str, args)], 0
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = argv
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def one_error_line(code, err, *fragments):
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ----------------------------------------------------------------------------------------------------------------------
# plain text, packed


@pytest.fixture(scope="module")
def c4_text(stories260k, tmp_path_factory, shared_data):
    """The first 60 C4 documents packed into 1024-token sequences (10 held-out documents)."""
    out = tmp_path_factory.mktemp("c4-1024")
    source = shared_data / "c4" / "c4-train.00000-of-01024.first1000.json.gz"
    prepare_text(out, stories260k, [source], seq_length=1024, val_documents=10, max_documents=60, log=lambda *_: None)
    return out


def test_packed_text_is_whole_sequences_of_documents(c4_text, stories260k, shared_data, tmp_path):
    from lit_adapter.data.tokenizer import Tokenizer

    train, val, meta = load_prepared(c4_text)
    assert {ex["input_ids"].numel() for ex in train + val} == {1024}
    assert all(torch.equal(ex["input_ids"], ex["labels"]) for ex in train + val)  # language modelling: every token
    assert (meta["train_records"], meta["val_records"], meta["max_seq_length"]) == (len(train), len(val), 1024)
    assert meta["splits"]["train"]["documents"] == 50 and meta["splits"]["val"]["documents"] == 10
    # each split is its documents' BOS + text + EOS, in order, cut into sequences; only the tail is dropped
    tok = Tokenizer(stories260k)
    with gzip.open(shared_data / "c4" / "c4-train.00000-of-01024.first1000.json.gz", "rt") as f:
        docs = [json.loads(next(f))["text"] for _ in range(60)]
    order = list(range(60))
    random.Random(42).shuffle(order)  # the documented seeded split, by whole documents
    for examples, ids in ((train, sorted(set(range(60)) - set(order[:10]))), (val, sorted(order[:10]))):
        expected = torch.cat([tok.encode(docs[i], bos=True, eos=True) for i in ids])
        stream = torch.cat([ex["input_ids"] for ex in examples])
        assert torch.equal(stream, expected[: stream.numel()]) and expected.numel() - stream.numel() < 1024
    # bad input is one line
    with pytest.raises(UserError, match="val_documents=60 must be between 1"):
        prepare_text(tmp_path / "x", stories260k, [shared_data / "c4" / "c4-train.00000-of-01024.first1000.json.gz"],
                     seq_length=64, val_documents=60, max_documents=60, log=lambda *_: None)
    (tmp_path / "doc.md").write_text("hello")
    with pytest.raises(UserError, match="expected .txt, .json or .jsonl"):
        prepare_text(tmp_path / "x", stories260k, [tmp_path / "doc.md"], log=lambda *_: None)


# ----------------------------------------------------------------------------------------------------------------------
# LongLoRA's LoRA+: what trains


# LLaMA 7B: LoRA r=8 on q, v = 2 x 32 x 8 x (4096 + 4096) = 4,194,304; q, k, v, o: 8,388,608. The embedding is
# 32000 x 4096 = 131,072,000; the norms 32 x 2 x 4096 + 4096 = 266,240. Adapter v2's own 4,279,744 already include
# the norms. stories260K (tied): LoRA q (8 x 64 + 64 x 8) + v (8 x 64 + 32 x 8) in 5 layers = 8,960, the embedding
# (= the head) 512 x 64 = 32,768, the norms 5 x 2 x 64 + 64 = 704.
@pytest.mark.parametrize("script, args, trainable", [
    ("lora", ["--lora.train_embeddings", "true", "--lora.train_norms", "true"], 4_194_304 + 131_072_000 + 266_240),
    ("lora", ["--lora.key", "true", "--lora.projection", "true", "--lora.train_embeddings", "true",
              "--lora.train_norms", "true"], 8_388_608 + 131_072_000 + 266_240),
    ("lora", ["--lora.train_norms", "true"], 4_194_304 + 266_240),
    ("adapter_v2", ["--adapter.train_embeddings", "true"], 4_279_744 + 131_072_000),
    ("adapter", ["--adapter.train_embeddings", "true"], 1_229_760 + 131_072_000),
])
def test_lora_plus_counts_on_7b_dry_run(cli, script, args, trainable):
    code, out, err = cli(f"finetune/{script}.py", "--model_name", "7B", "--dry_run", "true", *args)
    assert code == 0, err
    assert f"trainable parameters: {trainable}\n" in out


def test_lora_plus_trains_and_saves_embedding_and_norms(tmp_path):
    spec = MethodSpec("lora", LoRAConfig(**LORA_PLUS))
    trainable, _ = dry_run(spec, Config.from_name("stories260K"))
    assert trainable == 8_960 + 32_768 + 704
    keep = trainable_filter(spec)
    assert keep("transformer.wte.weight") and keep("transformer.h.3.norm_2.weight") and keep("transformer.ln_f.weight")
    assert keep("transformer.h.0.attn.q_proj.lora_A") and not keep("transformer.h.0.attn.q_proj.linear.weight")
    assert not trainable_filter(MethodSpec("lora"))("transformer.wte.weight")  # plain LoRA: as before
    assert trainable_filter(MethodSpec("adapter_v2", AdapterConfig(train_embeddings=True)))("transformer.wte.weight")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method, settings, pattern", [
    ("lora", dict(LORA_PLUS, key=True, projection=True), "shifted"),
    ("adapter_v2", dict(train_embeddings=True, start_layer=1), "dense"),
    ("adapter", dict(train_embeddings=True, start_layer=1), "dense"),
])
def test_saved_activations_match_autograd(method, settings, pattern, tied):
    """A trained embedding makes every block keep its inputs, and a tied head keep its input for its weight."""
    overrides = dict(name="small", block_size=64, vocab_size=1000, n_layer=3, n_head=4, n_query_groups=2, n_embd=64,
                     intermediate_size=192, tie_embeddings=tied)
    cell = Cell(model_name=None, config_overrides=overrides, method=method, method_settings=settings, pattern=pattern,
                seq_len=64, micro_batch_size=2)
    model = build_random_model(cell, torch.device("cpu")).train()
    measured = measure_saved_activations(model, torch.randint(0, 1000, (2, 64)))
    predicted = saved_activations(cell.config(), cell.spec(), 2, 64)
    assert (measured["layers"], measured["head"], measured["embedding"]) == (
        predicted["layers"], predicted["head"], predicted["embedding"])


@pytest.mark.parametrize("cell", [
    # the LongLoRA cell of docs/long_context.md at half its length: stories260K x2, shifted, LoRA+ on q/k/v/o
    Cell(model_name="stories260K", method="lora", method_settings=dict(LORA_PLUS, key=True, projection=True),
         pattern="shifted", seq_len=1024, micro_batch_size=2, rope_scaling=LINEAR2),
    Cell(model_name="stories260K", method="lora", method_settings=LORA_PLUS, seq_len=512, micro_batch_size=2,
         activation_checkpointing=True),
    Cell(model_name=None, config_overrides=dict(name="small-32k", block_size=256, vocab_size=32000, n_layer=3, n_head=4,
                                                n_embd=64, intermediate_size=192),
         method="adapter_v2", method_settings=dict(train_embeddings=True), seq_len=256, micro_batch_size=2,
         loss="chunked_head"),
], ids=["lora-plus-shifted-scaled", "lora-plus-checkpointed", "adapter_v2-embedding-chunked-head"])
def test_estimate_within_15_percent_of_measured_cpu_step(cell):
    cell.steps, cell.timed_steps = 2, 0
    measured = measure_step(cell)
    estimate = estimate_memory(cell.config(), cell.spec(), cell.micro_batch_size, cell.seq_len, cell.precision,
                               activation_checkpointing=cell.activation_checkpointing, loss=cell.loss)
    assert measured["trainable_params"] == estimate["trainable_params"]
    assert abs(estimate["peak_bytes"] / measured["peak_bytes"] - 1) < 0.15


# ----------------------------------------------------------------------------------------------------------------------
# a RoPE-scaled LongLoRA run on the real stories260K, end to end


def test_scaled_run_records_its_window_and_evaluation_rebuilds_it(cli, stories260k, c4_text, shared_data, tmp_path):
    common = ["--checkpoint_dir", stories260k, "--data.data_dir", c4_text, "--data.max_seq_length", 1024,
              "--lora.key", "true", "--lora.projection", "true", "--lora.train_embeddings", "true",
              "--lora.train_norms", "true", "--attention.pattern", "shifted", "--train.global_batch_size", 2,
              "--train.micro_batch_size", 2, "--train.max_steps", 2, "--eval.max_batches", 1, "--eval.initial", "false",
              "--fabric.accelerator", "cpu"]
    # past the 512-token window without scaling: one line that names the fix, and nothing is written
    code, _, err = cli("finetune/lora.py", *common, "--out_dir", tmp_path / "refused")
    one_error_line(code, err, "--data.max_seq_length=1024 exceeds the model's window, block_size=512",
                   "--model.rope_scaling '{\"type\": \"linear\", \"factor\": 2}'")
    assert not (tmp_path / "refused").exists()
    code, out, err = cli("finetune/lora.py", *common, "--dry_run", "true", "--model.rope_scaling", json.dumps(LINEAR2))
    assert code == 0, err
    assert "context: 1024 tokens per sequence, of a window of 1024 tokens (linear x2 of the pretrained 512)" in out
    code, _, err = cli("finetune/lora.py", *common, "--model.rope_scaling", json.dumps({"type": "linear", "factor": 1}),
                       "--out_dir", tmp_path / "bad")
    one_error_line(code, err, "factor must be a number > 1")

    out_dir = tmp_path / "run"
    code, out, err = cli("finetune/lora.py", *common, "--model.rope_scaling", json.dumps(LINEAR2), "--out_dir", out_dir)
    assert code == 0, err[-3000:]
    recorded = {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 512}
    assert json.loads((out_dir / "hparams.json").read_text())["rope_scaling"] == recorded
    assert json.loads((out_dir / "final" / "adapter_config.json").read_text())["rope_scaling"] == recorded
    saved = load_file(out_dir / "final" / "adapter.safetensors")
    assert "transformer.wte.weight" in saved and "transformer.ln_f.weight" in saved
    # loading the run rebuilds its window, its trained embedding and its attention (or the one asked for)
    config, model, spec = load_finetuned(stories260k, out_dir / "final", torch.device("cpu"), torch.float32)
    assert config.block_size == 1024 and config.rope_scaling == recorded and spec.attention.pattern == "shifted"
    assert torch.equal(model.transformer.wte.weight, saved["transformer.wte.weight"])
    # evaluation: the base refuses 1024 tokens, the fine-tuned run evaluates them, --model.rope_scaling extends the base
    ppl = ["--datasets", "wikitext2", "--data_dir", shared_data, "--seqlen", 1024, "--max_windows", 1, "--progress",
           "false"]
    code, _, err = cli("evaluate/perplexity.py", "--checkpoint_dir", stories260k, *ppl)
    one_error_line(code, err, "--seqlen=1024 exceeds the model's window, block_size=512")
    code, out, err = cli("evaluate/perplexity.py", "--checkpoint_dir", stories260k, "--adapter_dir", out_dir / "final",
                         "--attention.pattern", "dense", "--out_dir", tmp_path / "eval", *ppl)
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "perplexity.json").read_text())
    assert (report["window"], report["rope_scaling"], report["attention"]) == (1024, recorded, "dense")
    code, out, err = cli("evaluate/perplexity.py", "--checkpoint_dir", stories260k, "--model.rope_scaling",
                         json.dumps(LINEAR2), *ppl)
    assert code == 0 and "wikitext2: perplexity" in out, err
    code, _, err = cli("evaluate/perplexity.py", "--checkpoint_dir", stories260k, "--adapter_dir", out_dir / "final",
                       *ppl[:-4], "--seqlen", 2048, "--max_windows", 1)
    one_error_line(code, err, "--seqlen=2048 exceeds the scaled window, block_size=1024 (linear x2 of the "
                              "pretrained 512); raise the factor, e.g. --model.rope_scaling "
                              "'{\"type\": \"linear\", \"factor\": 4}'")
