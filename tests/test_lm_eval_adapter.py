"""The lm-evaluation-harness adapter: its three request types against HF ``LlamaForCausalLM`` on the same weights,
and a tiny local multiple-choice task run end to end through ``lm_eval.simple_evaluate`` (no hub)."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lit_adapter.model.config import Config  # noqa: E402
from lit_adapter.convert import lit_to_hf_state_dict, write_checkpoint_dir  # noqa: E402
from lit_adapter.evaluation import load_model  # noqa: E402
from lit_adapter.evaluation.lm_eval_adapter import LitAdapterLM  # noqa: E402
from lit_adapter.model.gpt import GPT  # noqa: E402

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high. Lily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do."
)


@pytest.fixture(scope="module")
def random32k(tmp_path_factory, shared_data):
    torch.manual_seed(3)
    config = Config.from_name("tiny-32k")
    model = GPT(config)
    model.init_weights(std=0.3)
    out = tmp_path_factory.mktemp("random32k_lm_eval")
    write_checkpoint_dir(out, config, model.state_dict(), shared_data / "tokenizers" / "llama" / "tokenizer.model")
    return out


def reference(checkpoint_dir):
    """HF model on the same weights and the raw SentencePiece processor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, model, _, _, _ = load_model(checkpoint_dir, device="cpu")
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager",
    ))
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=False)
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.eval(), spm.SentencePieceProcessor(model_file=str(Path(checkpoint_dir) / "tokenizer.model"))


@torch.no_grad()
def hf_logprob(hf, inputs, targets):
    """Sum of log p(targets) and whether each is the argmax, where the logits of the last ``len(targets)``
    positions of ``inputs`` predict ``targets`` (``targets[-1]`` is the token after ``inputs``)."""
    logp = torch.log_softmax(hf(torch.tensor([inputs])).logits[0].double(), -1)
    rows = logp[len(inputs) - len(targets) :]
    return sum(rows[i, t].item() for i, t in enumerate(targets)), all(
        rows[i].argmax().item() == t for i, t in enumerate(targets))


def requests(kind, args):
    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("checkpoint", ["stories260k", "random32k"])
def test_loglikelihood_matches_hf(checkpoint, request):
    ckpt = request.getfixturevalue(checkpoint)
    hf, sp = reference(ckpt)
    pairs = [
        ("Once upon a time, there was a", " little girl"),
        ("Lily went to the park ", "and played"),  # the trailing space moves into the continuation
        ("", "Once upon a time"),  # empty context: scored after BOS
        (STORY, " The end."),
    ]
    lm = LitAdapterLM(checkpoint_dir=str(ckpt), device="cpu", batch_size=3)
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        if context:
            stripped = context.rstrip()
            continuation = context[len(stripped):] + continuation
            ctx = sp.encode(stripped)
            cont = sp.encode(stripped + continuation)[len(ctx):]
        else:
            ctx, cont = [], sp.encode(continuation)
        inputs = [sp.bos_id()] + ctx + cont[:-1]
        expected, expected_greedy = hf_logprob(hf, inputs, cont)
        assert logp == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy


def test_greedy_flag_and_generate_until(stories260k):
    hf, sp = reference(stories260k)
    lm = LitAdapterLM(checkpoint_dir=str(stories260k), device="cpu", max_gen_toks=40)
    context = "Once upon a time"
    ids = [sp.bos_id()] + sp.encode(context)
    with torch.no_grad():
        for _ in range(40):  # greedy decoding with HF, recomputing the whole sequence each step
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_text = sp.decode(ids[len(sp.encode(context)) + 1:])
    assert greedy_text.startswith(", there was a little girl")

    out = lm.generate_until(requests("generate_until", [
        (context, {"until": ["."], "do_sample": False}),
        (context, {"until": ["Lily", "zebra"], "max_gen_toks": 40}),
        (context, {"until": [], "max_gen_toks": 5}),
    ]))
    assert out[0] == greedy_text.split(".")[0]
    assert out[1] == greedy_text.split("Lily")[0]
    assert out[2] == sp.decode(ids[len(sp.encode(context)) + 1 :][:5])

    # the greedy continuation is flagged greedy; a likely-but-not-greedy one is not
    greedy_cont = out[0]
    (lp, is_greedy), (_, not_greedy) = lm.loglikelihood(requests("loglikelihood", [
        (context, greedy_cont), (context, ", there was a big dog"),
    ]))
    assert is_greedy and not not_greedy and lp < 0


def test_loglikelihood_rolling_matches_hf_windows(stories260k):
    hf, sp = reference(stories260k)
    L = 40
    lm = LitAdapterLM(checkpoint_dir=str(stories260k), device="cpu", max_length=L, batch_size=2)
    tokens = sp.encode(STORY)
    assert len(tokens) > 2 * L  # several windows, the last one partial
    # every token predicted once: the first window after BOS, later ones with the L tokens before their end
    expected, start = 0.0, 0
    while start < len(tokens):
        end = min(start + L, len(tokens))
        if start == 0:
            inputs = [sp.bos_id()] + tokens[: end - 1]
        else:
            inputs = tokens[end - L - 1 : end - 1]
        expected += hf_logprob(hf, inputs, tokens[start:end])[0]
        start = end
    short = "Lily saw a cat."
    full = [sp.bos_id()] + sp.encode(short)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(STORY,), (short,)]))
    assert got[0] == pytest.approx(expected, rel=1e-5)
    # a text shorter than the window is the log-likelihood of the whole sequence after BOS
    assert got[1] == pytest.approx(hf_logprob(hf, full[:-1], full[1:])[0], rel=1e-5)


def test_simple_evaluate_on_a_local_task(stories260k, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = [
        {"context": "Once upon a time, there was a little", "choices": [" girl", " car", " table"], "label": 0},
        {"context": "Lily loved to play outside in the", "choices": [" computer", " park", " number"], "label": 1},
        {"context": "The dog was very", "choices": [" happy", " seventeen", " of"], "label": 0},
        {"context": "Tom wanted to eat the", "choices": [" because", " cake", " ran"], "label": 2},  # a wrong label
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n"
    )
    lm = LitAdapterLM(checkpoint_dir=str(stories260k), device="cpu")
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    # accuracy recomputed from our own log-likelihoods: the argmax choice against the label
    correct = 0
    for doc in docs:
        scores = lm.loglikelihood(requests("loglikelihood", [(doc["context"], c) for c in doc["choices"]]))
        correct += max(range(3), key=lambda i: scores[i][0]) == doc["label"]
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    assert correct == 3  # the model knows its stories; the mislabelled one is missed
