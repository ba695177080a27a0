"""Evaluations of a prompt-method model use the real tokens' context, ``block_size`` less the virtual tokens: the
default perplexity window and lm-eval's ``max_length`` fit, MMLU and classification prompts are cut to fit, and a
window that does not fit is refused in one line before any scoring."""

import pytest
import torch
import virtual_token_helpers as vt

from lit_adapter.errors import UserError
from lit_adapter.evaluation.perplexity import Corpus, evaluate_corpus
from lit_adapter.generation.decode import real_window, room_for
from lit_adapter.tuners.prompt_tuning import PromptTuningConfig

P = 6


@pytest.fixture(scope="module")
def prompted():
    torch.manual_seed(0)
    return vt.method_model("prompt_tuning", vt.base_model("tiny"), PromptTuningConfig(num_virtual_tokens=P))


def test_real_window_subtracts_the_virtual_tokens(prompted):
    assert prompted.config.block_size == 128
    assert real_window(prompted) == 128 - P
    assert real_window(vt.base_model("tiny")) == 128
    assert room_for(prompted, 100) == 128 - P - 100


def test_perplexity_window_of_the_real_context_scores_and_one_more_is_refused(prompted):
    tokens = torch.randint(0, 512, (3 * 128,))
    corpus = Corpus("wikitext2", "", "test")
    result = evaluate_corpus(prompted, tokens, corpus, seqlen=128 - P, progress=False)
    assert result.windows == 3 and result.seqlen == 128 - P
    assert result.tokens_scored == 3 * (128 - P - 1)
    # the same windows scored by hand: every window's own tokens after the virtual prefix
    with torch.no_grad():
        nll = []
        for i in range(3):
            window = tokens[i * (128 - P):(i + 1) * (128 - P)][None]
            logits = prompted(window)[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits.float(), window[0, 1:], reduction="sum"))
    assert result.nll == pytest.approx((sum(nll) / (3 * (128 - P - 1))).item(), rel=1e-5)
    with pytest.raises(UserError, match=rf"--seqlen=123 and the adapter's {P} virtual tokens exceed .*--seqlen {128 - P}"):
        evaluate_corpus(prompted, tokens, corpus, seqlen=128 - P + 1, progress=False)


def test_lm_eval_max_length_defaults_to_the_real_context(prompted):
    pytest.importorskip("lm_eval")
    from lit_adapter.evaluation.lm_eval_adapter import LitAdapterLM

    class Tok:
        bos_id, eos_id = 1, 2

    lm = LitAdapterLM(model=prompted, tokenizer=Tok())
    assert lm.max_length == 128 - P
    with pytest.raises(UserError, match=rf"max_length=128 exceeds the model's context of {128 - P} tokens \({P} of"):
        LitAdapterLM(model=prompted, tokenizer=Tok(), max_length=128)
