"""The tokenizer files of an exported HF folder, which ``transformers.AutoTokenizer`` loads with our token ids.

An HF folder gets the SentencePiece ``tokenizer.model`` itself, plus:

* ``tokenizer.json``: the same BPE model for the ``tokenizers`` library, built here from the SentencePiece
  ``ModelProto``. Without it transformers 5 converts ``tokenizer.model`` by itself, and its Llama conversion
  (a ``Metaspace`` pre-tokenizer that adds no dummy prefix to text that already starts with a space, and no word
  splitting) gives other ids than SentencePiece for runs of spaces at the start of a text or alone
  ("  leading" or " "). The file is written by hand (a documented JSON format), so exporting needs neither
  ``tokenizers`` nor ``transformers``.
* ``tokenizer_config.json`` (``tokenizer_class`` ``PreTrainedTokenizerFast``: the generic class that loads
  ``tokenizer.json`` as it is; transformers 5's ``LlamaTokenizer`` would rebuild its own pre-tokenizer and lose
  the fix above) and ``special_tokens_map.json``.

How SentencePiece's BPE encodes (what ``tokenizer.json`` reproduces): the text is normalized (LLaMA's models and
the llama2.c vocabularies use the ``identity`` normalizer, a dummy-prefix ``"▁"`` and every ``" "`` as ``"▁"``),
split into words (with ``split_by_whitespace`` a word starts at a ``"▁"`` that ends a run of non-spaces; with
``allow_whitespace_only_pieces`` a run of spaces stays one word), then in each word the adjacent pair whose
concatenation is the highest-scoring piece is merged until none is left; characters outside the vocabulary
become ``<0xNN>`` byte pieces. ``tokenizers``' BPE merges by rank, so every split ``(left, right)`` of every
normal piece becomes a merge, ranked by the score of the piece it makes. Pieces that SentencePiece matches
before BPE (user-defined) or never emits (unused), other normalizers and suffix whitespace are refused, since
the file would then not give SentencePiece's ids.

One deliberate difference: ``<s>``, ``</s>`` and ``<unk>`` written literally in a text are special tokens for
transformers (as for every HF tokenizer) but plain characters for SentencePiece.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from lit_adapter.errors import UserError

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    return model, sp_pb2


def _check_reproducible(model, sp_pb2, source: str) -> None:
    """Refuses SentencePiece settings whose encoding ``tokenizer.json`` below would not reproduce."""
    Type = sp_pb2.ModelProto.SentencePiece.Type
    trainer, norm = model.trainer_spec, model.normalizer_spec
    problems = []
    if trainer.model_type != sp_pb2.TrainerSpec.ModelType.BPE:
        problems.append(f"model_type {sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} (only BPE)")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"normalizer {norm.name!r} (only identity)")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    kinds = {Type.Name(p.type) for p in model.pieces if p.type in (Type.USER_DEFINED, Type.UNUSED)}
    if kinds:
        problems.append(f"{' and '.join(sorted(kinds)).lower()} pieces")
    if problems:
        raise UserError(f"the tokenizer {source} uses SentencePiece settings the exported tokenizer.json cannot "
                        f"reproduce: {', '.join(problems)}")


def tokenizer_json(model_bytes: bytes, source: str = "tokenizer.model") -> Dict[str, Any]:
    """The ``tokenizers`` JSON of the SentencePiece BPE model ``model_bytes`` (a serialized ``ModelProto``)."""
    model, sp_pb2 = _proto(model_bytes)
    _check_reproducible(model, sp_pb2, source)
    Type = sp_pb2.ModelProto.SentencePiece.Type
    trainer, norm = model.trainer_spec, model.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    # only normal pieces take part in merges: control, unknown and byte pieces are never merged into or from
    scores = {p.piece: p.score for p in model.pieces if p.type == Type.NORMAL}
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                # SentencePiece merges the pair that makes the highest-scoring piece: rank by that score
                ranked.append((-score, vocab[piece], cut, left, right))
    ranked.sort()
    # "left right" strings are the merge format every tokenizers version reads; a piece with a space would be
    # ambiguous there, so then the newer [left, right] pairs are written
    spaced = any(" " in piece for piece in scores)
    merges = [[left, right] if spaced else f"{left} {right}" for *_, left, right in ranked]

    special = [(i, p.piece) for i, p in enumerate(model.pieces) if p.type in (Type.CONTROL, Type.UNKNOWN)]
    unk = next((p.piece for p in model.pieces if p.type == Type.UNKNOWN), None)
    normalizers: List[Dict[str, Any]] = []
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": _SPACE})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": _SPACE})
    if not trainer.split_by_whitespace:
        pre_tokenizer = None  # the whole text is one word
    elif trainer.allow_whitespace_only_pieces:
        # a word: a run of "▁" and the non-spaces after it; a run of "▁" at the end is a word of its own
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": f"{_SPACE}*[^{_SPACE}]+|{_SPACE}+"},
                         "behavior": "Isolated", "invert": False}
    else:  # every "▁" starts a word
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": f"{_SPACE}[^{_SPACE}]*|[^{_SPACE}]+"},
                         "behavior": "Isolated", "invert": False}
    decoders: List[Dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = model.pieces[trainer.bos_id].piece if 0 <= trainer.bos_id < len(model.pieces) else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for i, piece in special
        ],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _bos_template(bos, vocab.get(bos)) if bos is not None else None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(trainer.byte_fallback),
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def _bos_template(bos: str, bos_id: int) -> Dict[str, Any]:
    """Prepends BOS to every text, as our ``Tokenizer.encode`` does by default (and LLaMA was trained)."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _piece(model, index: int) -> Optional[str]:
    return model.pieces[index].piece if 0 <= index < len(model.pieces) else None


def write_tokenizer_files(out_dir: Path, model_bytes: bytes, model_max_length: int,
                          source: str = "tokenizer.model") -> List[str]:
    """Writes ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    into ``out_dir``; returns their names."""
    model, _ = _proto(model_bytes)
    trainer = model.trainer_spec
    tokens = {"bos_token": _piece(model, trainer.bos_id), "eos_token": _piece(model, trainer.eos_id),
              "unk_token": _piece(model, trainer.unk_id), "pad_token": _piece(model, trainer.pad_id)}
    special_map = {k: v for k, v in tokens.items() if v is not None}
    as_json = tokenizer_json(model_bytes, source)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": tokens["bos_token"] is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in as_json["added_tokens"]
        },
    }
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    (out_dir / "tokenizer.json").write_text(json.dumps(as_json, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
