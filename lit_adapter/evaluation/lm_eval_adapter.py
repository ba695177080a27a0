"""Our models inside EleutherAI's lm-evaluation-harness (Gao et al.,
https://github.com/EleutherAI/lm-evaluation-harness).

The harness asks a model three kinds of questions; :class:`LitAdapterLM` answers them with a base or fine-tuned
checkpoint of this project, so any harness task (HellaSwag, ARC, LAMBADA, ...) runs on it, offline if the task's
data is local:

* ``loglikelihood(context, continuation)``: the summed log-probability of the continuation's tokens and whether
  greedy decoding would produce exactly them. As in the harness's own HF model, trailing spaces of the context
  move to the continuation and ``context + continuation`` is encoded as a whole, then split at the length of the
  encoded context (SentencePiece gives a lone " word" an extra dummy-prefix space). An empty context is replaced
  by the prefix token (BOS). Inputs longer than the context window keep their last ``max_length`` tokens.
* ``loglikelihood_rolling(text)``: the log-likelihood of a whole document, every token scored once, in
  windows of ``max_length`` tokens with the harness's own window split (``get_rolling_token_windows``).
* ``generate_until(context, gen_kwargs)``: greedy (or sampled, with ``do_sample``) generation with the KV cache
  until EOS, ``max_gen_toks`` tokens or the first of the ``until`` strings (which is cut off).

LLaMA checkpoints are trained with a BOS token at the start of every sequence, so contexts get one
(``add_bos_token=True``; the harness's HF model defaults to none).

Use from Python::

    import lm_eval
    from lit_adapter.evaluation.lm_eval_adapter import LitAdapterLM
    lm = LitAdapterLM(checkpoint_dir="checkpoints/open_llama_7b", adapter_dir="out/lora/final", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or from the harness's command line (after ``import lit_adapter.evaluation.lm_eval_adapter`` has registered it,
e.g. through a small wrapper script) as ``--model lit_adapter --model_args checkpoint_dir=...,adapter_dir=...``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lit_adapter.errors import UserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # an optional dependency: only this module needs it
    raise UserError(f"the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval ({err})") from None

Pair = Tuple[List[int], List[int]]


@register_model("lit_adapter")
class LitAdapterLM(LM):
    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        tokenizer=None,
        checkpoint_dir: Optional[str] = None,
        adapter_dir: Optional[str] = None,
        quantize: Optional[str] = None,
        precision: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: Any = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        **unused: Any,  # the harness passes options meant for other backends (max_batch_size, ...)
    ) -> None:
        """Wraps a loaded ``model`` and ``tokenizer``, or loads ``checkpoint_dir`` (+ ``adapter_dir``) itself."""
        super().__init__()
        if model is None:
            if checkpoint_dir is None:
                raise UserError("LitAdapterLM needs a model and tokenizer, or checkpoint_dir")
            from lit_adapter.evaluation import load_model

            _, model, tokenizer, _, _ = load_model(checkpoint_dir, adapter_dir, quantize, precision, device)
        if tokenizer is None:
            raise UserError("LitAdapterLM was given a model without its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported
        from lit_adapter.generation.decode import real_window

        window = real_window(model)  # virtual tokens take their positions first
        self.max_length = int(max_length) if max_length is not None else window
        if self.max_length > window:
            raise UserError(f"max_length={self.max_length} exceeds the model's context of {window} tokens"
                            + (f" ({model.num_virtual_tokens} of its {model.config.block_size} positions are virtual"
                               " tokens)" if window < model.config.block_size else ""))
        self.max_gen_toks = int(max_gen_toks)
        # a tokenizer without BOS (GPT-2: bos_id -1) adds none, and an empty context starts from EOS, as lm-eval's HFLM
        self.add_bos_token = add_bos_token in (True, "True", "true", "1") and tokenizer.bos_id >= 0
        self.prefix_token_id = tokenizer.bos_id if self.add_bos_token else tokenizer.eos_id

    # -- tokenization ---------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False).tolist()

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        prefix = [self.prefix_token_id] if self.add_bos_token else []
        return prefix + ctx, whole[len(ctx) :]

    # -- scoring --------------------------------------------------------------------------------------------------

    def _score(self, pairs: Sequence[Pair]) -> List[Tuple[float, bool]]:
        """``(sum log p(continuation | context), greedy?)`` per pair, longest inputs first, in right-padded batches."""
        from lit_adapter.evaluation.perplexity import continuation_logprobs

        fitted = []
        for context, continuation in pairs:
            if not continuation:
                raise UserError("lm-eval asked for the log-likelihood of an empty continuation")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}")
            keep = self.max_length + 1 - len(continuation)  # the window holds context + continuation[:-1]
            fitted.append((context[-keep:], continuation))
        order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(fitted)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, result in zip(chunk, continuation_logprobs(self.model, [fitted[i] for i in chunk])):
                results[i] = result
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> List[float]:
        totals = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self._encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            totals.append(sum(logp for logp, _ in self._score(windows)))
        return totals

    # -- generation -----------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> List[str]:
        from lit_adapter.generation.decode import generate_tokens

        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs: Dict[str, Any] = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            if max_new >= self.max_length:
                raise UserError(
                    f"max_gen_toks={max_new} leaves no room for the context in max_length={self.max_length}"
                )
            prefix = [self.tokenizer.bos_id] if self.add_bos_token else []
            ids = (prefix + self._encode(context))[-(self.max_length - max_new) :]
            new: List[int] = []
            text = ""
            for token in generate_tokens(self.model, torch.tensor(ids, device=self._device), max_new, temperature,
                                         eos_id=self.tokenizer.eos_id):
                if token.item() == self.tokenizer.eos_id:
                    break
                new.append(token.item())
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:  # cut at the first stop string, as the harness's models do
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
        return outputs
