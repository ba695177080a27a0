"""Perplexity against an independent reference: HF ``LlamaForCausalLM`` on the same weights, with its own
``labels=`` loss, on the real wikitext-2 / PTB / C4 files, with the text and the tokens rebuilt independently."""

import functools
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_state_dict, write_checkpoint_dir
from lit_adapter.errors import UserError
from lit_adapter.evaluation import load_model
from lit_adapter.evaluation.perplexity import (
    Corpus, evaluate_corpus, load_corpus, make_windows, run_perplexity, token_logprobs,
)
from lit_adapter.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4



@pytest.fixture(scope="session")
def random32k(tmp_path_factory, shared_data):
    """A random tiny model with the real 32,000-piece LLaMA tokenizer, initialised with std 0.02 (HF's default)."""
    torch.manual_seed(1234)
    config = Config.from_name("tiny-32k")
    model = GPT(config)
    model.init_weights(std=0.02)
    out = tmp_path_factory.mktemp("random32k")
    write_checkpoint_dir(out, config, model.state_dict(), shared_data / "tokenizers" / "llama" / "tokenizer.model")
    return out


def hf_model(checkpoint_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    config, model, _, _, _ = load_model(checkpoint_dir, device="cpu", precision="32-true")
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager",
    )
    hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=False)
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


@functools.lru_cache(maxsize=None)
def reference_text(name, data):
    """The evaluated string, rebuilt here the way the GPTQ code builds it from the HF datasets."""
    if name == "wikitext2":  # HF rows joined with "\n\n"
        rows = [json.loads(line)["text"] for line in (data / "wikitext-2-raw" / "wiki.test.rows.jsonl").open()]
        return "\n\n".join(rows)
    if name == "ptb":  # the HF loader yields line.strip() per line; GPTQ's ptb_new joins the sentences with " "
        return " ".join(line.strip() for line in (data / "ptb" / "ptb.test.txt").read_text().split("\n")[:-1])
    with gzip.open(data / "c4" / "c4-train.00000-of-01024.first1000.json.gz", "rt") as f:
        docs = [json.loads(line)["text"] for line in f]
    return " ".join(docs[:1100])


def reference_tokens(checkpoint_dir, text, n_tokens):
    """The first ``n_tokens`` of BOS + SentencePiece(text), tokenizing only a prefix of the text (fast).

    SentencePiece never merges across a space, so a prefix cut at a space tokenizes to a prefix of the whole
    text's tokens; the last word is dropped in case the cut split it.
    """
    sp = spm.SentencePieceProcessor(model_file=str(Path(checkpoint_dir) / "tokenizer.model"))
    chars = 8 * n_tokens
    while True:
        cut = text.rfind(" ", 0, chars)
        ids = [sp.bos_id()] + sp.encode(text[:cut])
        if len(ids) > n_tokens + 16 or chars >= len(text):
            return torch.tensor(ids[:n_tokens])
        chars *= 2


@torch.no_grad()
def hf_nonoverlapping_ppl(hf, tokens, seqlen, n_windows):
    """GPTQ's loop: window i is tokens[i*seqlen:(i+1)*seqlen]; HF's mean loss over its seqlen-1 targets."""
    nll = 0.0
    for i in range(n_windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen][None]
        nll += hf(input_ids=ids, labels=ids).loss.double().item() * (seqlen - 1)
    return math.exp(nll / (n_windows * (seqlen - 1)))


@torch.no_grad()
def hf_sliding_ppl(hf, tokens, max_length, stride, max_windows=None):
    """The HF perplexity guide: labels of the already-scored context are -100."""
    nll, count, prev_end, n = 0.0, 0, 0, tokens.numel()
    for i, begin in enumerate(range(0, n, stride)):
        if max_windows is not None and i == max_windows:
            break
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        ids = tokens[begin:end][None]
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        scored = int((labels[:, 1:] != -100).sum())
        nll += hf(input_ids=ids, labels=labels).loss.double().item() * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("checkpoint", ["stories260k", "random32k"])
def test_perplexity_matches_hf_on_real_datasets(checkpoint, request, shared_data, tmp_path):
    ckpt = request.getfixturevalue(checkpoint)
    seqlen, n_windows = (256, 3) if checkpoint == "stories260k" else (128, 4)
    report = run_perplexity(
        ckpt, datasets="wikitext2,ptb,c4", seqlen=seqlen, max_windows=n_windows, batch_size=2,
        data_dir=shared_data, out_dir=tmp_path, progress=False,
    )
    hf = hf_model(ckpt)
    for name in ("wikitext2", "ptb", "c4"):
        result = report["results"][name]
        tokens = reference_tokens(ckpt, reference_text(name, shared_data), n_windows * seqlen)
        expected = hf_nonoverlapping_ppl(hf, tokens, seqlen, n_windows)
        assert result["perplexity"] == pytest.approx(expected, rel=REL_TOL), name
        assert result["windows"] == n_windows
        assert result["tokens_scored"] == n_windows * (seqlen - 1)
        if name == "c4":
            assert result["corpus_tokens"] == 256 * seqlen  # GPTQ's c4_new cut
        assert result["tokens_per_second"] > 0
    assert "NOT the validation shard" in report["results"]["c4"]["note"]
    assert json.loads((tmp_path / "perplexity.json").read_text())["results"]["ptb"]["perplexity"] == pytest.approx(
        report["results"]["ptb"]["perplexity"]
    )


def test_sliding_window_matches_hf_guide(stories260k, shared_data):
    config, model, tokenizer, _, _ = load_model(stories260k, device="cpu")
    corpus = load_corpus("wikitext2", shared_data)
    tokens = tokenizer.encode(corpus.text)[:700]  # a short corpus so that the last, shorter window is reached
    result = evaluate_corpus(model, tokens, corpus, seqlen=256, stride=96, batch_size=3, progress=False)
    expected = hf_sliding_ppl(hf_model(stories260k), tokens, max_length=256, stride=96)
    assert result.perplexity == pytest.approx(expected, rel=REL_TOL)
    assert result.tokens_scored == 699  # every token but the first, exactly once
    assert result.windows == 6  # begins 0, 96, ..., 480; the one at 480 reaches the end


def test_sliding_window_end_to_end_on_ptb(random32k, shared_data):
    report = run_perplexity(random32k, datasets="ptb", seqlen=128, stride=32, max_windows=5, batch_size=2,
                            data_dir=shared_data, progress=False)
    result = report["results"]["ptb"]
    tokens = reference_tokens(random32k, reference_text("ptb", shared_data), 400)
    expected = hf_sliding_ppl(hf_model(random32k), tokens, max_length=128, stride=32, max_windows=5)
    assert result["perplexity"] == pytest.approx(expected, rel=REL_TOL)
    assert result["tokens_scored"] == 127 + 4 * 32 and result["tokens_processed"] == 5 * 128


def test_windows_arithmetic():
    assert [(w.begin, w.end, w.score_from) for w in make_windows(10, 4)] == [(0, 4, 1), (4, 8, 5)]
    sliding = make_windows(10, 4, stride=2)
    assert [(w.begin, w.end, w.score_from) for w in sliding] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert sum(w.scored for w in sliding) == 9
    assert len(make_windows(1000, 10, max_windows=3)) == 3
    with pytest.raises(UserError, match="too few"):
        make_windows(5, 8)
    with pytest.raises(UserError, match="stride"):
        make_windows(100, 8, stride=9)


class _Uniform(torch.nn.Module):
    """All-zero logits: every token has probability 1/V, so the perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


def test_uniform_model_and_c4_cut():
    tokens = torch.randint(0, 100, (256 * 16 + 50,))
    result = evaluate_corpus(_Uniform(100), tokens, Corpus("c4", "", "x"), seqlen=8, batch_size=64, progress=False)
    assert result.perplexity == pytest.approx(100, rel=1e-6)  # float32 log-softmax
    assert result.windows == 256  # GPTQ's c4_new keeps the first 256 * seqlen tokens
    assert result.corpus_tokens == 256 * 8


def test_random_model_scores_near_vocab_size(random32k, shared_data):
    # Init std 0.02 and a final RMSNorm with unit weights give logits z = h @ W with |h| = sqrt(n_embd), so
    # z ~ N(0, s^2), s = 0.02 * sqrt(32) = 0.11: E[-log p] = E[logsumexp z] - E[z_target] ~ log V + s^2/2, i.e.
    # ppl ~ 1.006 V. The mean target logit over ~500 tokens moves log(ppl/V) by well under s; 10% is 0.9 s.
    report = run_perplexity(random32k, datasets="wikitext2,ptb", max_windows=4, data_dir=shared_data, progress=False)
    for result in report["results"].values():
        assert abs(math.log(result["perplexity"] / 32000)) < 0.1


def test_pretrained_stories260k_knows_tinystories(stories260k, shared_data):
    # A uniform guess over the 512 pieces scores 512. The TinyStories model predicts its own greedy story almost
    # surely (~1.5) and plain children's-story sentences well (~3.0), but Wikipedia prose far worse (~100).
    from lit_adapter.generation.decode import generate

    _, model, tokenizer, _, _ = load_model(stories260k, device="cpu")
    story = tokenizer.decode(generate(model, tokenizer.encode("Once upon a time"), 100)[1:])
    simple = (
        "Tom and Lily went to the park. They saw a big dog. The dog was happy. Tom said, \"Let's play with the "
        "dog!\" Lily smiled and they played all day. At the end of the day, they went home and had a nice dinner."
    )
    ppl = {}
    for name, text in (("story", story), ("simple", simple)):
        tokens = tokenizer.encode(text)
        result = evaluate_corpus(model, tokens, Corpus(name, text, "test"), tokens.numel(), progress=False)
        ppl[name] = result.perplexity
    wiki = run_perplexity(stories260k, datasets="wikitext2", max_windows=2, data_dir=shared_data, progress=False)
    assert ppl["story"] < 2.5
    assert ppl["simple"] < 5
    assert wiki["results"]["wikitext2"]["perplexity"] > 10 * ppl["simple"]


def _save_finetuned(method, checkpoint_dir, out_dir):
    """A fine-tuned output folder whose trained tensors are random (so it differs from the base)."""
    from lit_adapter.tuners.adapter import AdapterConfig
    from lit_adapter.tuners.lora import LoRAConfig
    from lit_adapter.tuners.registry import MethodSpec, prepare_model, save_adapter, trainable_filter

    settings = {"adapter": AdapterConfig(prompt_length=4, start_layer=2), "adapter_v2": AdapterConfig(4, 2),
                "lora": LoRAConfig(r=4, alpha=8, mlp=True), "full": None}[method]
    spec = MethodSpec(method, settings)
    config = Config.from_checkpoint_dir(checkpoint_dir)
    model = prepare_model(spec, config, checkpoint_dir, torch.device("cpu"), torch.float32)
    keep = trainable_filter(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep(name, param):
                param.add_(torch.randn_like(param) * (0.02 if method == "full" else 0.3))
    save_adapter(model, spec, config, checkpoint_dir, out_dir)
    return model.eval()


@pytest.mark.parametrize("method", ["adapter", "adapter_v2", "lora", "full"])
def test_finetuned_variants(method, stories260k, shared_data, tmp_path):
    model = _save_finetuned(method, stories260k, tmp_path / "final")
    report = run_perplexity(stories260k, tmp_path / "final", datasets="ptb", seqlen=128, max_windows=3,
                            batch_size=3, data_dir=shared_data, progress=False)
    text = reference_text("ptb", shared_data)
    tokens = reference_tokens(stories260k, text, 3 * 128).view(3, 128)
    with torch.no_grad():
        logits = model(tokens)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    base = run_perplexity(stories260k, datasets="ptb", seqlen=128, max_windows=3, data_dir=shared_data, progress=False)
    got = report["results"]["ptb"]["perplexity"]
    assert got == pytest.approx(math.exp(nll.item()), rel=REL_TOL)
    assert got != pytest.approx(base["results"]["ptb"]["perplexity"], rel=1e-3)  # the fine-tuned tensors count
    assert report["method"].startswith(method)


def test_quantized_base(stories260k, shared_data):
    base = run_perplexity(stories260k, datasets="ptb", seqlen=128, max_windows=2, data_dir=shared_data,
                          progress=False)["results"]["ptb"]["perplexity"]
    nf4 = run_perplexity(stories260k, datasets="ptb", seqlen=128, max_windows=2, data_dir=shared_data,
                         quantize="bnb.nf4", progress=False)
    _, model, _, _, _ = load_model(stories260k, quantize="bnb.nf4", device="cpu")
    tokens = reference_tokens(stories260k, reference_text("ptb", shared_data), 256)
    lp = torch.cat(token_logprobs(model, [tokens[:128], tokens[128:]]))
    assert nf4["results"]["ptb"]["perplexity"] == pytest.approx(math.exp(-lp.double().mean().item()), rel=REL_TOL)
    # 4-bit weights cost a little, not everything
    assert 0.9 * base < nf4["results"]["ptb"]["perplexity"] < 1.5 * base


def test_padding_does_not_change_logprobs(stories260k):
    _, model, _, _, _ = load_model(stories260k, device="cpu")
    a, b = torch.randint(3, 512, (40,)), torch.randint(3, 512, (17,))
    batched = token_logprobs(model, [a, b])
    assert torch.allclose(batched[1], token_logprobs(model, [b])[0], atol=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "evaluate" / "perplexity.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_missing_dataset_file_is_a_clear_error(stories260k, tmp_path):
    (tmp_path / "data").mkdir()
    proc = _cli("--checkpoint_dir", stories260k, "--datasets", "ptb", "--data_dir", tmp_path / "data")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: dataset ptb: no local copy found")
    assert "ptb/ptb.test.txt" in proc.stderr and "--data_dir" in proc.stderr


def test_offline_hub_is_a_clear_error(stories260k):
    proc = _cli("--checkpoint_dir", stories260k, "--datasets", "wikitext2")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: dataset wikitext2: cannot load" in proc.stderr and "--data_dir" in proc.stderr


def test_unknown_dataset_name(stories260k):
    with pytest.raises(UserError, match="unknown dataset 'wiki'"):
        run_perplexity(stories260k, datasets="wiki")
