"""Offline stand-ins for GPT-2 and Llama 3: random-weight HF models and tiny BPE tokenizers trained here.

The tokenizers are built with HF ``tokenizers`` the way the real ones are (GPT-2: byte-level BPE without a prefix
space, ``<|endoftext|>``; Llama 3: a tiktoken-style byte-level BPE with Llama 3's pre-tokenizer regex, its special
tokens, a ``<|begin_of_text|>`` post-processor and its chat template), trained on a slice of WikiText-2.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path("/work/shared/data/wikitext-2-raw/wiki.test.rows.jsonl")
TRICKY = [
    "Hello world", " leading space", "  two leading spaces", "multiple   inner    spaces", "trailing  ",
    "new\nlines\n\n and\ttabs", "digits 1234567 and 3.14159", "unicode: café naïve Ærøskøbing 東京 Привет",
    "emoji 😀🚀👩‍👩‍👧 mixed", "", " ", "\n", "<|endoftext|> in text", "it's they're we'll I'M",
    "<|begin_of_text|>hi<|eot_id|>", "a<|start_header_id|>user<|end_header_id|>b",
]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def corpus(n: int = 400):
    rows = [json.loads(line)["text"] for line in DATA.read_text(encoding="utf-8").splitlines()[:n]]
    return [r for r in rows if r.strip()] + TRICKY


def gpt2_tokenizer_dir(folder: Path, vocab_size: int = 400, files: str = "both") -> Path:
    """A GPT-2-style tokenizer in ``folder``: ``vocab.json`` + ``merges.txt`` and/or ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    if files in ("both", "vocab"):
        tok.model.save(str(folder))
    if files in ("both", "json"):
        tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False, "add_bos_token": False, "model_max_length": 64,
    }))
    return folder


def llama3_tokenizer_dir(folder: Path, vocab_size: int = 400) -> Path:
    """A Llama-3-style ``tokenizer.json`` (+ ``tokenizer_config.json`` with the chat template) in ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIAL), special_tokens=[],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_CHAT_TEMPLATE, "model_max_length": 256,
        "clean_up_tokenization_spaces": True,
    }))
    return folder


def hf_gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, vocab_size: int = 512, n_positions: int = 64,
            seed: int = 0):
    """A random ``GPT2LMHeadModel`` (float32, eval) with non-trivial LayerNorm and bias values."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                     n_positions=n_positions, bos_token_id=vocab_size - 1,
                                     eos_token_id=vocab_size - 1)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_llama3(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, n_kv: int = 2, vocab_size: int = 512,
              tie: bool = False, seed: int = 0):
    """A random ``LlamaForCausalLM`` shaped like Llama 3.1 (llama3 rope scaling, GQA, rope_theta 500000)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=88, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=tie,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def perplexity_matches_hf(lit_dir: Path, hf_dir: Path, data_dir: Path, tmp_path: Path, seqlen: int,
                          n_windows: int = 3) -> float:
    """Our perplexity evaluation on WikiText-2 against HF's loss on the windows of HF's own token ids; returns
    our perplexity (the caller asserts on it)."""
    import math

    import torch
    import transformers

    from lit_adapter.evaluation.perplexity import run_perplexity

    report = run_perplexity(lit_dir, datasets="wikitext2", seqlen=seqlen, max_windows=n_windows, batch_size=2,
                            data_dir=data_dir, out_dir=tmp_path, progress=False)
    rows = [json.loads(line)["text"] for line in (data_dir / "wikitext-2-raw" / "wiki.test.rows.jsonl").open()]
    text = "\n\n".join(rows)[: 40 * seqlen * n_windows]  # a prefix holds the first windows' tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokens = torch.tensor(tokenizer(text)["input_ids"][: seqlen * n_windows])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    nll = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            ids = tokens[i * seqlen:(i + 1) * seqlen][None]
            nll += hf(input_ids=ids, labels=ids).loss.double().item() * (seqlen - 1)
    expected = math.exp(nll / (n_windows * (seqlen - 1)))
    ours = report["results"]["wikitext2"]["perplexity"]
    assert abs(ours - expected) <= 1e-4 * expected, (ours, expected)
    return ours


ROBERTA_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def roberta_tokenizer_dir(folder: Path, vocab_size: int = 400, files: str = "vocab") -> Path:
    """A RoBERTa-style tokenizer in ``folder``: GPT-2's byte-level BPE with RoBERTa's special tokens at ids 0-4
    (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4) in ``vocab.json`` + ``merges.txt``, and with
    ``files="both"`` also the ``tokenizer.json`` HF's ``RobertaTokenizerFast`` saves from them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=ROBERTA_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    if files == "both":
        from transformers import RobertaTokenizerFast

        hf = RobertaTokenizerFast.from_pretrained(str(folder))
        hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder
