"""Generation: the KV cache changes nothing, sampling knobs behave, the command line prints text and stats."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.generation.decode import generate, sample
from lit_adapter.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]


def greedy_without_cache(model, prompt, steps):
    idx = prompt.clone()
    for _ in range(steps):
        logits = model(idx[None])[0, -1]
        idx = torch.cat([idx, logits.argmax()[None]])
    return idx


@pytest.fixture(scope="module")
def stories(stories260k):
    from lit_adapter.checkpoint import load_checkpoint_dir

    config, model, tokenizer = load_checkpoint_dir(stories260k)
    return stories260k, model, tokenizer


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_greedy_with_kv_cache_equals_greedy_without(name):
    model = GPT(Config.from_name(name)).eval()
    model.init_weights(std=0.2)  # peaked logits, so the argmax is not decided by rounding
    prompt = torch.randint(0, 512, (7,))
    with torch.no_grad():
        reference = greedy_without_cache(model, prompt, 40)
    assert torch.equal(generate(model, prompt, max_new_tokens=40, temperature=0.0), reference)


def test_greedy_stories260k_with_and_without_cache_token_for_token(stories):
    _, model, tokenizer = stories
    prompt = tokenizer.encode("Once upon a time")
    with torch.no_grad():
        reference = greedy_without_cache(model, prompt, 60)
    cached = generate(model, prompt, max_new_tokens=60, temperature=0.0)
    assert cached.tolist() == reference.tolist()
    assert tokenizer.decode(cached.tolist()).startswith("Once upon a time, there was a little girl named Lily.")


def test_sampling_respects_top_k_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    torch.manual_seed(0)
    draws = {int(sample(logits, temperature=1.0, top_k=2)) for _ in range(200)}
    assert draws == {1, 2}
    assert int(sample(logits, temperature=0.0)) == 1
    with pytest.raises(UserError):
        sample(logits, temperature=-1.0)


def test_generation_stops_at_eos_and_at_the_context():
    model = GPT(Config.from_name("tiny", block_size=16)).eval()
    model.init_weights(std=0.2)
    prompt = torch.randint(0, 512, (10,))
    out = generate(model, prompt, max_new_tokens=50, temperature=0.0)
    assert len(out) == 16  # cut at block_size
    first = int(out[10])
    stopped = generate(model, prompt, max_new_tokens=50, temperature=0.0, eos_id=first)
    assert stopped.tolist() == out[:11].tolist()


@pytest.mark.parametrize("extra", [[], ["--quantize", "bnb.int8"]])
def test_generate_base_command(stories, extra):
    checkpoint_dir, _, _ = stories
    proc = subprocess.run(
        [sys.executable, str(REPO / "generate" / "base.py"), "--checkpoint_dir", str(checkpoint_dir),
         "--prompt", "Once upon a time", "--temperature", "0", "--max_new_tokens", "30", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time, there was a little girl")
    assert "tokens/s" in proc.stderr and "peak memory" in proc.stderr


def test_adapter_that_does_not_fit_the_base_is_a_clear_error(tmp_path, stories):
    from lit_adapter.tuners.adapter import AdapterConfig
    from lit_adapter.tuners.registry import MethodSpec, build_model, load_finetuned, save_adapter

    checkpoint_dir, _, _ = stories
    other = Config.from_name("stories260K", n_embd=32, n_head=4, n_query_groups=2)
    model = build_model(MethodSpec("adapter", settings=AdapterConfig(start_layer=1)), other)
    save_adapter(model, MethodSpec("adapter", settings=AdapterConfig(start_layer=1)), other, checkpoint_dir,
                 tmp_path / "final")
    size = (tmp_path / "final" / "adapter.safetensors").stat().st_size
    assert size < 10_000  # only the prompts and gates, not the base
    with pytest.raises(UserError, match="do not fit this base model.*shape mismatch.*adapter_wte"):
        load_finetuned(checkpoint_dir, tmp_path / "final", torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------- sampling knobs

def test_top_p_keeps_the_smallest_set_that_reaches_p():
    from lit_adapter.generation.sampling import top_p_filter

    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[False, True, False, True]]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert torch.isfinite(top_p_filter(probs.log(), 0.1)).tolist() == [[False, True, False, False]]  # >= one
    torch.manual_seed(0)
    draws = {int(sample(probs.log(), temperature=1.0, top_p=0.7)) for _ in range(300)}
    assert draws == {1, 3}


def test_sampling_steps_equal_hf_logits_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    from lit_adapter.generation.sampling import apply_repetition_penalty, top_k_filter, top_p_filter

    torch.manual_seed(3)
    logits = torch.randn(4, 50) * 3
    seen = torch.randint(0, 50, (4, 12))
    ours = apply_repetition_penalty(logits, seen, 1.3)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()))
    scaled = TemperatureLogitsWarper(0.7)(seen, ours.clone())
    assert torch.equal(top_k_filter(ours / 0.7, 10), TopKLogitsWarper(10)(seen, scaled.clone()))
    filtered = TopKLogitsWarper(10)(seen, scaled.clone())
    assert torch.equal(torch.isfinite(top_p_filter(filtered, 0.8)),
                       torch.isfinite(TopPLogitsWarper(0.8)(seen, filtered.clone())))


def test_repetition_penalty_hand_case():
    from lit_adapter.generation.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert int(sample(logits, temperature=0.0, repetition_penalty=4.0, seen=torch.tensor([[0]]))) == 2


def test_bad_sampling_settings_are_user_errors():
    logits = torch.zeros(1, 4)
    for kwargs in ({"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}, {"top_k": 0}):
        with pytest.raises(UserError):
            sample(logits, temperature=1.0, **kwargs)


# ---------------------------------------------------------------------------------------------- batches, stops, streams

def test_batched_greedy_equals_unbatched_row_by_row():
    from lit_adapter.generation.decode import generate_batch

    model = GPT(Config.from_name("tiny-gqa")).eval()
    model.init_weights(std=0.2)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 512, (n,)) for n in (3, 11, 7, 1)]
    batched = generate_batch(model, prompts, max_new_tokens=25, temperature=0.0)
    single = [generate(model, p, max_new_tokens=25, temperature=0.0)[p.numel():].tolist() for p in prompts]
    assert batched == single
    # a row that reaches EOS stops alone; the others go on
    eos = single[1][4]
    stopped = generate_batch(model, prompts, max_new_tokens=25, temperature=0.0, eos_id=eos)
    for row, ids in zip(single, stopped):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert ids == row[:cut]


def test_batched_greedy_with_an_adapter_and_the_sparse_fallback(stories):
    from lit_adapter.model.attention import AttentionConfig, apply_attention
    from lit_adapter.generation.decode import generate_batch

    _, model, tokenizer = stories
    prompts = [tokenizer.encode(t) for t in ("Once upon a time", "The dog", "Tom and his mom went to the park")]
    dense = generate_batch(model, prompts, max_new_tokens=20, temperature=0.0)
    assert dense == [generate(model, p, 20, temperature=0.0)[p.numel():].tolist() for p in prompts]
    apply_attention(model, AttentionConfig(pattern="local", window=8))
    try:  # sparse kernels decode one prompt at a time: the same tokens as unbatched
        local = generate_batch(model, prompts, max_new_tokens=10, temperature=0.0)
        assert local == [generate(model, p, 10, temperature=0.0)[p.numel():].tolist() for p in prompts]
    finally:
        apply_attention(model, AttentionConfig())


def test_stop_strings_cut_the_text_and_streaming_prints_the_same(stories260k, capsys):
    from lit_adapter.cli.generate import run_generation

    common = dict(prompt="Once upon a time", max_new_tokens=40, temperature=0.0, device="cpu")
    full = run_generation(stories260k, stop=None, stream=False, **common)[0]
    assert full.startswith(", there was a little girl named Lily.")
    capsys.readouterr()
    cut = run_generation(stories260k, stop=["girl", "never appears"], stream=False, **common)[0]
    assert cut == ", there was a little "
    printed = capsys.readouterr().out
    streamed = run_generation(stories260k, stop=["girl"], stream=True, **common)[0]
    assert streamed == cut and capsys.readouterr().out == printed


def test_the_generate_command_reads_a_prompts_file(stories260k, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe dog\n")
    proc = subprocess.run([sys.executable, str(REPO / "generate" / "base.py"), "--checkpoint_dir", str(stories260k),
                           "--prompts_file", str(prompts), "--max_new_tokens", "8", "--temperature", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--- ") == 2 and "Once upon a time" in proc.stdout and "The dog" in proc.stdout
    assert "(2 prompts)" in proc.stderr


def test_the_compiled_decode_step_gives_the_same_tokens():
    """torch.compile of the one-token step (about 30 s of compilation on this CPU, once per process)."""
    from lit_adapter.generation.decode import generate_batch

    model = GPT(Config.from_name("tiny")).eval()
    model.init_weights(std=0.2)
    prompts = [torch.randint(1, 512, (5,), generator=torch.Generator().manual_seed(2))]
    assert generate_batch(model, prompts, 12, temperature=0.0, compile=True) == \
        generate_batch(model, prompts, 12, temperature=0.0)
