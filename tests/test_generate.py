"""Generation: the KV cache changes nothing, sampling knobs behave, the command line prints text and stats."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.generate import generate, sample
from lit_adapter.model import GPT

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
    from lit_adapter.methods import MethodSpec, build_model, load_finetuned, save_adapter

    checkpoint_dir, _, _ = stories
    other = Config.from_name("stories260K", n_embd=32, n_head=4, n_query_groups=2)
    model = build_model(MethodSpec("adapter", settings=AdapterConfig(start_layer=1)), other)
    save_adapter(model, MethodSpec("adapter", settings=AdapterConfig(start_layer=1)), other, checkpoint_dir,
                 tmp_path / "final")
    size = (tmp_path / "final" / "adapter.safetensors").stat().st_size
    assert size < 10_000  # only the prompts and gates, not the base
    with pytest.raises(UserError, match="do not fit this base model.*shape mismatch.*adapter_wte"):
        load_finetuned(checkpoint_dir, tmp_path / "final", torch.device("cpu"), torch.float32)
