"""HF ``tokenizers`` backend of :class:`lit_adapter.data.tokenizer.Tokenizer`: GPT-2's, Llama 3's and RoBERTa's
byte-level BPE.

A checkpoint folder holds either ``tokenizer.json`` (Llama 3, any HF fast tokenizer) or GPT-2's ``vocab.json`` +
``merges.txt`` (built here as HF builds GPT-2's: byte-level pre-tokenizer without a prefix space, byte-level
decoder, ``<|endoftext|>`` a special token), optionally with ``tokenizer_config.json`` (its ``eos_token`` and
``chat_template``).

BOS and EOS, kept consistent with HF and with how our data preparation uses them (``encode(bos=True)`` for every
prompt, ``eos=True`` after every training target):

* ``bos_id`` is the token HF's own encoding (``add_special_tokens=True``) puts before a text, if any: Llama 3's
  ``<|begin_of_text|>``; GPT-2 has none, so ``bos_id == -1`` (SentencePiece's "no such token") and
  ``encode(bos=True)`` adds nothing, exactly as HF's GPT-2 tokenizer does.
* ``eos_id`` is ``tokenizer_config.json``'s ``eos_token``, else ``<|endoftext|>`` (GPT-2) or ``<|end_of_text|>``
  (Llama 3) when the vocabulary has it. ``eos=True`` appends it (HF never does; our training targets end with it).

RoBERTa's ``vocab.json`` + ``merges.txt`` (a vocabulary holding ``<s>``, ``<pad>``, ``</s>``) is built as HF's
``RobertaTokenizerFast``: its five special tokens, ``bos_id`` ``<s>``, ``eos_id`` ``</s>``, ``pad_id`` ``<pad>``, and
its template for one text and for pairs (:meth:`BPETokenizer.encode_pair`; from ``tokenizer.json`` alike).

Special tokens written literally in a text (``"<|eot_id|>"``) are encoded as those tokens, as HF does. ``decode``
drops special tokens (as SentencePiece drops ``<s>``/``</s>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lit_adapter.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON, MERGES_TXT = "vocab.json", "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG, "special_tokens_map.json")
"""The files a checkpoint folder with a BPE tokenizer keeps (those present are copied by the converters)."""
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""RoBERTa's special tokens (ids 0 to 3 and the last one in its vocab.json): a vocabulary with the first three is
RoBERTa's, whose text starts with <s> (BOS), ends with </s> (EOS) and pads with <pad>."""


def bpe_source(folder: Path) -> Optional[Path]:
    """``tokenizer.json`` or ``vocab.json`` (with ``merges.txt``) in ``folder``; None when neither is there."""
    if (folder / TOKENIZER_JSON).is_file():
        return folder / TOKENIZER_JSON
    if (folder / VOCAB_JSON).is_file() and (folder / MERGES_TXT).is_file():
        return folder / VOCAB_JSON
    return None


def json_tokenizer_kind(path: Path) -> Optional[str]:
    """``"tokenizer.json"`` or ``"vocab.json"`` when ``path`` holds that JSON (judged by its content, whatever the
    file is named: a SentencePiece model renamed ``tokenizer.json`` is still a protobuf), else None."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} looks like a JSON tokenizer but is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return TOKENIZER_JSON
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        return VOCAB_JSON
    raise UserError(f"{path} is JSON but neither a tokenizer.json (no \"model\") nor a vocab.json (token -> id)")


def check_merges(path: Path) -> None:
    """Each line of GPT-2's ``merges.txt`` after its ``#version`` header is two pieces; a cut or damaged file is
    named here (``tokenizers`` would report it as a problem with the vocabulary it was loaded with)."""
    if not path.is_file():
        raise UserError(f"{path} not found: a vocab.json tokenizer needs its merges.txt beside it")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        if len(line.split(" ")) != 2:
            raise UserError(f"{path} line {number} is not a merge of two pieces ({line[:40]!r}): the file is cut "
                            "or damaged; copy it again from the checkpoint")


def _load(path: Path, kind: Optional[str] = None):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    kind = kind or json_tokenizer_kind(path) or path.name
    if kind == VOCAB_JSON:
        check_merges(path.with_name(MERGES_TXT))
    try:
        if kind == VOCAB_JSON:
            vocab = json.loads(path.read_text(encoding="utf-8"))
            tok = HFTokenizer(models.BPE.from_file(str(path), str(path.with_name(MERGES_TXT))))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            if all(t in vocab for t in ROBERTA_SPECIALS[:3]):
                # as transformers' RobertaTokenizerFast builds it from these two files: its specials, and the
                # template <s> A </s> and <s> A </s></s> B </s> (a hub tokenizer.json declares its own)
                tok.add_special_tokens(list(ROBERTA_SPECIALS))
                tok.post_processor = processors.RobertaProcessing(
                    ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False)
                return tok
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            # as HF's GPT2Tokenizer: <|endoftext|> (its default bos/eos/unk) is a special token, appended to the
            # vocabulary when vocab.json lacks it
            tok.add_special_tokens(["<|endoftext|>"])
            return tok
        return HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exceptions for malformed files
        raise UserError(f"cannot load tokenizer {path}: {str(err).splitlines()[0] if str(err) else err}") from None


class BPETokenizer:
    """The ``tokenizers`` backend; :class:`lit_adapter.data.tokenizer.Tokenizer` returns one for a BPE folder."""

    def _init_bpe(self, path: Path) -> None:
        self.path = path
        self.backend = _load(path)
        self.processor = None  # no SentencePiece model
        config_path = path.with_name(TOKENIZER_CONFIG)
        self.tokenizer_config: Dict[str, Any] = {}
        if config_path.is_file():
            try:
                self.tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{config_path} is not valid JSON: {err}") from None
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        plain = self.backend.encode("a", add_special_tokens=False).ids
        prefix = with_special[: len(with_special) - len(plain)]
        self.bos_id = prefix[0] if len(prefix) == 1 and with_special[len(prefix):] == plain else -1
        eos = self._token_name(self.tokenizer_config.get("eos_token"))
        candidates = [eos] if eos else list(_EOS_NAMES)
        ids = [self.backend.token_to_id(t) for t in candidates]
        self.eos_id = next((i for i in ids if i is not None), -1)
        self.pad_id = -1
        if all(self.backend.token_to_id(t) is not None for t in ROBERTA_SPECIALS[:3]):  # RoBERTa's (either file)
            self.bos_id, self.pad_id, self.eos_id = (self.backend.token_to_id(t) for t in ROBERTA_SPECIALS[:3])

    @staticmethod
    def _token_name(value: Any) -> Optional[str]:
        return value.get("content") if isinstance(value, dict) else value

    @property
    def chat_template(self) -> Optional[str]:
        template = self.tokenizer_config.get("chat_template")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def _finish(self, ids: List[int], bos: bool, eos: bool, max_length: int, device) -> torch.Tensor:
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1,
               device: Optional[torch.device] = None) -> torch.Tensor:
        return self._finish(self.backend.encode(text, add_special_tokens=False).ids, bos, eos, max_length, device)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False, max_length: int = -1,
                     device: Optional[torch.device] = None) -> List[torch.Tensor]:
        encoded = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._finish(e.ids, bos, eos, max_length, device) for e in encoded]

    def encode_pair(self, first: str, second: Optional[str] = None,
                    max_length: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, token_type_ids)`` of one text or a pair with the tokenizer's own special tokens, as HF's
        ``tokenizer(first, second)`` gives them: RoBERTa's ``<s> A </s>`` and ``<s> A </s></s> B </s>`` (token types
        all 0), BERT's ``[CLS] A [SEP] B [SEP]`` (types 0 then 1). ``max_length > 0`` cuts as HF's
        ``truncation=True`` does (``longest_first``: a token at a time from the longer text; the specials stay)."""
        if self.backend.post_processor is None or self.backend.encode("a", "b").ids == \
                self.backend.encode("a", add_special_tokens=False).ids + self.backend.encode(
                    "b", add_special_tokens=False).ids:
            raise UserError(f"the tokenizer {self.path} has no template for text pairs (GPT-2's and Llama's have "
                            "none): pairs are encoded by an encoder's tokenizer (RoBERTa, BERT)")
        if max_length > 0:
            self.backend.enable_truncation(max_length, strategy="longest_first")
        try:
            encoded = self.backend.encode(first, second)
        finally:
            self.backend.no_truncation()
        return torch.tensor(encoded.ids, dtype=torch.long), torch.tensor(encoded.type_ids, dtype=torch.long)

    def token_spans(self, text: str) -> List[Tuple[int, int]]:
        """UTF-8 byte ``(begin, end)`` of each token of ``encode(text, bos=False)``; where byte-level tokens split
        one character, all but the last of them are empty, so every ``end`` is a character boundary."""
        offsets = self.backend.encode(text, add_special_tokens=False).offsets  # character offsets
        to_byte = [0]
        for ch in text:
            to_byte.append(to_byte[-1] + len(ch.encode("utf-8")))
        spans = [(to_byte[b], to_byte[e]) for b, e in offsets]
        for i in range(len(spans) - 1):
            if spans[i + 1][0] < spans[i][1]:  # the next token is still inside this token's characters
                spans[i] = (spans[i][0], spans[i][0])
        return spans

    def decode(self, ids: Union[torch.Tensor, List[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=True)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of ``messages`` (``role``/``content`` dicts) under the checkpoint's ``chat_template`` (jinja2,
        as HF renders it); the template writes BOS itself, so encode the result with ``bos=False``."""
        if self.chat_template is None:
            raise UserError(f"the tokenizer {self.path} has no chat_template in {TOKENIZER_CONFIG}")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        names = {k: self._token_name(self.tokenizer_config.get(k)) or "" for k in ("bos_token", "eos_token")}

        def raise_exception(message):
            raise UserError(f"chat template: {message}")

        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                **names)
        except jinja2.TemplateError as err:
            raise UserError(f"cannot apply the chat template of {self.path}: {err}") from None
