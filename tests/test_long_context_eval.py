"""Long-context evaluation (issue 26): passkey retrieval and perplexity against context length on the real
stories260K, base, RoPE-scaled and fine-tuned. The prompt is LongLoRA's, rebuilt here from its script; the key sits
at the asked depth; accuracy equals a hand count on an outcome forced by a copying oracle; the curve scores the
same tokens at every length and equals evaluate/perplexity.py's sliding windows on them."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_adapter.evaluation import passkey
from lit_adapter.evaluation.context_curve import length_curve
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.model.config import Config
from lit_adapter.tuners.lora import LoRAConfig
from lit_adapter.tuners.registry import MethodSpec, load_finetuned, prepare_model, save_adapter, trainable_filter
from test_long_context import LINEAR2, cli, one_error_line  # noqa: F401  (cli: fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(stories260k):
    return Tokenizer.from_checkpoint_dir(stories260k)


@pytest.fixture(scope="module")
def scaled_run(stories260k, tmp_path_factory):
    """A LoRA run's final/ folder at a window of 1024 (linear x2), with random trained tensors (so it differs)."""
    spec = MethodSpec("lora", LoRAConfig(r=4, alpha=8))
    config = Config.from_checkpoint_dir(stories260k).with_rope_scaling(LINEAR2)
    model = prepare_model(spec, config, stories260k, torch.device("cpu"), torch.float32)
    keep = trainable_filter(spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep(name, param):
                param.add_(torch.randn_like(param) * 0.3)
    out = tmp_path_factory.mktemp("scaled_lora") / "final"
    save_adapter(model, spec, config, stories260k, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# passkey prompts


def longlora_prompt(n_garbage_prefix, n_garbage_suffix, key):
    """LongLoRA's ``generate_prompt_landmark`` (passkey_retrivial.py), with the split and the key given."""
    task_description = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                        "them. I will quiz you about the important information there.")
    garbage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    garbage_inf = " ".join([garbage] * 5000)
    information_line = f"The pass key is {key}. Remember it. {key} is the pass key."
    final_question = "What is the pass key? The pass key is"
    lines = [task_description, garbage_inf[:n_garbage_prefix], information_line, garbage_inf[:n_garbage_suffix],
             final_question]
    return "\n".join(lines)


@pytest.mark.parametrize("length", [256, 1024])
def test_passkey_prompt_is_longloras_with_the_key_at_the_asked_depth(tokenizer, length):
    key = passkey.draw_keys(seed=0, cell="x", digits=5, distractors=0)[0]
    assert len(key) == 5 and key == passkey.draw_keys(0, "x", 5, 9)[0]  # the key does not depend on the distractors
    assert len(set(passkey.draw_keys(0, "x", 5, 9))) == 10 and passkey.draw_keys(0, "y", 5, 0)[0] != key
    first = passkey.make_prompt(tokenizer, length, 0.0, key)
    last = passkey.make_prompt(tokenizer, length, 1.0, key)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        p = passkey.make_prompt(tokenizer, length, depth, key)
        before = round(depth * p.filler_chars)
        assert p.text == longlora_prompt(before, p.filler_chars - before, key)
        assert p.tokens.tolist() == tokenizer.encode(p.text, bos=True).tolist()
        assert p.answer == tokenizer.encode(key, bos=False).tolist()  # LongLoRA's answer_ids (BOS dropped)
        # as long as it can be: a few characters more filler would not fit
        assert length - 8 < p.length <= length
        assert passkey.make_prompt(tokenizer, length, depth, key).text == p.text  # deterministic
        # the key's line starts at key_position: the tokens before it decode to the text before it
        head = p.text[: p.text.index("The pass key is")]
        assert tokenizer.decode(p.tokens[1 : p.key_position]).rstrip("\n") == head.rstrip("\n")
        assert tokenizer.decode(p.tokens[p.key_position :]).lstrip().startswith(f"The pass key is {key}.")
        # and at the asked fraction of the filler, counted in tokens (within 3: a cut word may split otherwise);
        # the prompts without filler before (depth 0) or after (depth 1) the key give the fixed parts' tokens
        before = p.key_position - first.key_position
        after = (p.tokens.numel() - p.key_position) - (last.tokens.numel() - last.key_position)
        assert abs(before - depth * (before + after)) <= 3, (before, after)
    assert first.key_position < 100 and last.key_position > length - 80  # right after the task, before the question


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_passkey_prompt_with_other_vocabularies(kind, shared_data, tmp_path):
    """LLaMA's real 32k SentencePiece vocabulary and a byte-level BPE one (GPT-2's kind, no BOS, no dummy space):
    the key's line is found, the prompt fills the length, and the answer is the key's tokens in context."""
    from family_fixtures import gpt2_tokenizer_dir

    path = shared_data / "tokenizers" / "llama" / "tokenizer.model" if kind == "llama" else gpt2_tokenizer_dir(tmp_path)
    tok = Tokenizer(path)
    for depth in (0.0, 0.5, 1.0):
        p = passkey.make_prompt(tok, 1024, depth, "70615")
        assert 1024 - 8 < p.length <= 1024 and p.tokens.tolist() == tok.encode(p.text, bos=True).tolist()
        assert tok.decode(p.tokens[p.key_position :]).lstrip().startswith("The pass key is 70615.")
        assert tok.decode(p.tokens.tolist() + p.answer).endswith("The pass key is 70615")
    if kind == "llama":
        assert p.answer == tok.encode("70615", bos=False).tolist()  # LongLoRA's answer_ids


def test_passkey_refuses_lengths_past_the_window_and_too_short(stories260k, cli, tmp_path):
    code, _, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--lengths", "[1024]",
                       "--out_dir", tmp_path / "out")
    one_error_line(code, err, "--lengths=1024 exceeds the model's window, block_size=512; extend it with RoPE")
    code, _, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--lengths", "[128]")
    one_error_line(code, err, "--lengths 128 is too short for the passkey prompt, which takes 166 tokens")
    code, _, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--depths", "[1.5]")
    one_error_line(code, err, "--depths must lie between 0 and 1 (the fraction of filler before the key), got 1.5")
    code, _, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--digits", 1,
                       "--distractors", 9)
    one_error_line(code, err, "--distractors=9 leaves no other 1-digit key to draw")
    assert not (tmp_path / "out").exists()


class CopyOracle(torch.nn.Module):
    """A forced outcome: an ideal induction head that sees only the last ``reach`` tokens. At position t it finds
    the earlier position j >= t - reach whose preceding tokens match the longest suffix ending at t (3 tokens at
    least, so a key's own repeated digit is no match), and predicts the token after j. It answers the passkey
    exactly when the key's line is within reach of the question, and scores every candidate key alike otherwise."""

    def __init__(self, reach, vocab_size, block_size):
        super().__init__()
        self.reach, self.vocab_size = reach, vocab_size
        self.config = SimpleNamespace(block_size=block_size, rope_scaling=None)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # its device is the model's

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            seq = idx[b]
            for t in range(max(T - 8, 1), T):  # only the last positions are ever read
                lo = max(t - self.reach, 0)
                run = torch.zeros(t - lo, dtype=torch.long)  # common suffix length of seq[..j] and seq[..t]
                for d in range(16):
                    j = torch.arange(lo, t) - d
                    ok = (j >= 0) & (run == d)
                    ok[ok.clone()] = seq[j[ok]] == seq[t - d]
                    run += ok.long()
                if run.max() >= 3:
                    best = lo + int((run == run.max()).nonzero().max())  # the longest match, then the latest
                    logits[b, t, seq[best + 1]] = 20.0
        return logits


def test_passkey_accuracy_equals_a_hand_count_on_a_forced_outcome(tokenizer):
    oracle = CopyOracle(reach=75, vocab_size=tokenizer.vocab_size, block_size=512)
    result = passkey.evaluate_passkey(oracle, tokenizer, lengths=[256, 512], depths=[0.0, 0.5, 1.0], trials=2,
                                      digits=5, distractors=3, seed=1)
    trials, cells = result["trials"], result["cells"]
    assert len(trials) == 12 and len(cells) == 6
    for t in trials:
        # `distance`: from the key's line to the end. At depth 1 (distance 77) the line's "is" is 60 tokens before
        # the question's; in every other cell here even the key's second mention is 88 or more tokens away, so a
        # reach of 75 separates them and the hand count below is unambiguous
        distance = t["tokens"] - t["key_position"]
        assert distance < 85 or distance > 115, distance
        assert t["correct"] == (distance < 100) and t["rank"] == (1 if t["correct"] else 4)
        assert t["answer"].strip() == t["key"] if t["correct"] else t["answer"].strip() != t["key"]
    # by hand: only the key right before the question (depth 1) is found, at both lengths
    accuracy = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    assert accuracy == {(256, 0.0): 0.0, (256, 0.5): 0.0, (256, 1.0): 1.0,
                        (512, 0.0): 0.0, (512, 0.5): 0.0, (512, 1.0): 1.0}
    assert all(c["top1"] == c["accuracy"] and c["trials"] == 2 for c in cells)
    assert all(c["mean_rank"] == (1.0 if c["accuracy"] else 4.0) for c in cells)


def test_greedy_answer_with_the_kv_cache_equals_full_forwards_on_a_scaled_model(stories260k, tokenizer):
    config, model, _ = load_finetuned(stories260k, None, torch.device("cpu"), torch.float32,
                                      rope_scaling={"type": "linear", "factor": 4})
    prompt = passkey.make_prompt(tokenizer, 2000, 0.5, "12345")
    cached = passkey.greedy_answer(model, prompt.tokens, 6)
    ids = prompt.tokens.clone()
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids[None])[0, -1].argmax().view(1)])
    assert cached == ids[prompt.tokens.numel():].tolist()


def test_passkey_end_to_end_on_scaled_base_and_finetuned_run(stories260k, scaled_run, cli, tmp_path):
    common = ["--depths", "[0.0, 1.0]", "--trials", 2, "--distractors", 3, "--progress", "false"]
    code, out, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--model.rope_scaling",
                         json.dumps(LINEAR2), "--out_dir", tmp_path / "base", *common)
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "base" / "passkey.json").read_text())
    assert report["window"] == 1024 and report["lengths"] == [256, 512, 1024]  # the default lengths: up to the window
    assert report["chance"]["top1"] == 0.25 and len(report["cells"]) == 6 and len(report["trials"]) == 12
    with open(tmp_path / "base" / "passkey.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["length"]), float(r["depth"]), float(r["accuracy"])) for r in rows] == \
        [(c["length"], c["depth"], c["accuracy"]) for c in report["cells"]]
    for c in report["cells"]:  # the cells summarize their trials
        ts = [t for t in report["trials"] if (t["length"], t["depth"]) == (c["length"], c["depth"])]
        assert c["accuracy"] == sum(t["correct"] for t in ts) / 2 and c["mean_rank"] == sum(t["rank"] for t in ts) / 2
        assert all(c["length"] - 8 < t["tokens"] <= c["length"] for t in ts)
    assert (tmp_path / "base" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in out and "wrote" in out

    code, out, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--adapter_dir",
                         scaled_run, "--lengths", "[1024]", "--out_dir", tmp_path / "run", *common)
    assert code == 0, err[-3000:]
    run = json.loads((tmp_path / "run" / "passkey.json").read_text())
    assert run["window"] == 1024 and run["method"].startswith("lora") and run["rope_scaling"]["factor"] == 2
    assert [t["logprob"] for t in run["trials"]] != [t["logprob"] for t in report["trials"] if t["length"] == 1024]
    code, _, err = cli("evaluate/long_context.py", "passkey", "--checkpoint_dir", stories260k, "--adapter_dir",
                       scaled_run, "--lengths", "[2048]", *common)
    one_error_line(code, err, "--lengths=2048 exceeds the scaled window, block_size=1024 (linear x2 of the pretrained "
                              "512); raise the factor")
    code, out, err = cli("evaluate/long_context.py", "plot", "--reports",
                         json.dumps([str(tmp_path / "base" / "passkey.json"), str(tmp_path / "run" / "passkey.json")]),
                         "--out", tmp_path / "both.png")
    assert code == 0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG", err


# ----------------------------------------------------------------------------------------------------------------------
# perplexity against context length


def test_curve_scores_the_same_tokens_and_equals_perplexity_py_on_them(stories260k, shared_data, cli, tmp_path):
    lengths, scored, segments = [64, 128, 256], 32, 4
    code, out, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--datasets",
                         "wikitext2", "--data_dir", shared_data, "--lengths", json.dumps(lengths), "--scored", scored,
                         "--segments", segments, "--spacing", scored, "--out_dir", tmp_path / "curve")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "curve" / "context_length.json").read_text())
    points = report["points"]
    assert [p["context"] for p in points] == lengths
    assert {p["tokens_scored"] for p in points} == {segments * scored}  # the same count ...
    assert report["segment_ends"]["wikitext2"] == [256, 288, 320, 352]  # ... of the same tokens: the stretches end
    # at the same places for every length (contiguous with --spacing = --scored)
    assert (tmp_path / "curve" / "context_length.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "curve" / "context_length.csv") as f:
        assert [float(r["perplexity"]) for r in csv.DictReader(f)] == [p["perplexity"] for p in points]

    # evaluate/perplexity.py --seqlen 64 --stride 32: its window k ends at 64 + 32 k and scores its last 32 tokens
    # (k >= 1), so windows 6..9 are the curve's stretches at length 64: the difference of 10 and 6 windows
    def ppl_total(max_windows):
        code, _, err = cli("evaluate/perplexity.py", "--checkpoint_dir", stories260k, "--datasets", "wikitext2",
                           "--data_dir", shared_data, "--seqlen", 64, "--stride", 32, "--max_windows", max_windows,
                           "--progress", "false", "--out_dir", tmp_path / f"ppl{max_windows}")
        assert code == 0, err
        r = json.loads((tmp_path / f"ppl{max_windows}" / "perplexity.json").read_text())["results"]["wikitext2"]
        return r["nll"] * r["tokens_scored"], r["tokens_scored"]

    (nll10, n10), (nll6, n6) = ppl_total(10), ppl_total(6)
    assert n10 - n6 == segments * scored
    assert points[0]["nll"] == pytest.approx((nll10 - nll6) / (n10 - n6), rel=1e-9)
    # more context changes the numbers (the model reads it)
    assert len({p["nll"] for p in points}) == 3


def test_curve_on_scaled_and_finetuned_models_and_its_refusals(stories260k, scaled_run, shared_data, cli, tmp_path):
    from lit_adapter.evaluation.perplexity import load_corpus, tokenize_corpus

    common = ["--datasets", "wikitext2,c4", "--data_dir", shared_data, "--segments", 2, "--scored", 64]
    code, out, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--adapter_dir",
                         scaled_run, "--out_dir", tmp_path / "run", *common)
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "run" / "context_length.json").read_text())
    assert report["lengths"] == [256, 512, 1024] and report["window"] == 1024
    assert [(p["dataset"], p["context"]) for p in report["points"]] == \
        [(d, n) for d in ("wikitext2", "c4") for n in (256, 512, 1024)]
    assert "c4" in report["notes"]  # the local C4 text is not the validation shard: said so
    # the numbers are the model's: the run's own window and weights, computed again here in the library
    _, model, _ = load_finetuned(stories260k, scaled_run, torch.device("cpu"), torch.float32)
    tokens = tokenize_corpus(Tokenizer.from_checkpoint_dir(stories260k), load_corpus("wikitext2", shared_data))
    again = length_curve(model.eval(), tokens, "wikitext2", [256, 512, 1024], scored=64, segments=2)
    assert [p.perplexity for p in again["points"]] == pytest.approx(
        [p["perplexity"] for p in report["points"][:3]], rel=1e-6)

    code, _, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--lengths", "[256, 1024]",
                       *common)
    one_error_line(code, err, "--lengths=1024 exceeds the model's window, block_size=512")
    code, _, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--lengths", "[64, 128]",
                       *common)
    one_error_line(code, err, "--scored=64 must be below the shortest length, 64")
    code, _, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--model.rope_scaling",
                       json.dumps(LINEAR2), "--lengths", "[1024]", "--datasets", "wikitext2", "--data_dir",
                       shared_data, "--segments", 100000)
    one_error_line(code, err, "too few for 100000 segments")
    (tmp_path / "file").write_text("x")
    code, _, err = cli("evaluate/long_context.py", "curve", "--checkpoint_dir", stories260k, "--out_dir",
                       tmp_path / "file", *common)
    one_error_line(code, err, "is a file, not a folder")
