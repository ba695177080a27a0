"""The checkpoint's tokenizer: SentencePiece (LLaMA 1/2, llama2.c vocabularies) or byte-level BPE (GPT-2, Llama 3).

:class:`Tokenizer` picks its backend from the files in the checkpoint folder: ``tokenizer.model`` is
SentencePiece; otherwise ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` are loaded with HF's
``tokenizers`` library (:mod:`lit_adapter.data.bpe_tokenizer`, which says how BOS/EOS behave there: GPT-2 has no BOS,
``bos_id == -1``, and ``encode(bos=True)`` then adds nothing, as HF does). Both have the same interface.

Every checkpoint directory holds a SentencePiece ``tokenizer.model``. karpathy's llama2.c ships its vocabularies in
its own ``tokenizer.bin`` format instead (a list of ``(score, piece)`` records). That format holds everything a
SentencePiece BPE model needs (the pieces and their merge priorities), so :func:`llama2c_vocab_to_sentencepiece`
rebuilds a real SentencePiece ``ModelProto`` from it and encoding/decoding stay SentencePiece's own. llama2.c's
encoder (dummy-prefix space, one symbol per UTF-8 character with byte fallback, then repeatedly merge the adjacent
pair whose concatenation has the highest score) is SentencePiece's BPE encoder with the "identity" normalizer, no
whitespace collapsing; ``tests/test_tokenizer.py`` checks the two agree id for id on real text.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from lit_adapter.data.bpe_tokenizer import HF_TOKENIZER_FILES, BPETokenizer, bpe_source, json_tokenizer_kind
from lit_adapter.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_N_SPECIAL = 3  # <unk>, <s>, </s>
_N_BYTES = 256


def read_llama2c_vocab(path: Union[str, Path]) -> Tuple[List[bytes], List[float]]:
    """The raw pieces (UTF-8 bytes, with " " for "▁") and scores of a llama2.c ``tokenizer.bin``.

    Layout: int32 ``max_token_length``, then per token float32 score, int32 length and that many bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"llama2.c tokenizer not found: {path}")
    data = path.read_bytes()
    if len(data) < 4:
        raise UserError(f"{path} is not a llama2.c tokenizer file (only {len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces: List[bytes] = []
    scores: List[float] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise UserError(f"{path} is not a llama2.c tokenizer file (truncated record at byte {offset})")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or length > max_len or offset + length > len(data):
            raise UserError(
                f"{path} is not a llama2.c tokenizer file (token {len(pieces)} has length {length}, "
                f"max_token_length is {max_len})"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    return pieces, scores


def llama2c_vocab_to_sentencepiece(path: Union[str, Path]) -> bytes:
    """A serialized SentencePiece BPE ``ModelProto`` equivalent to the llama2.c vocabulary at ``path``.

    Ids are preserved: 0/1/2 become the ``<unk>``/``<s>``/``</s>`` control pieces, 3..258 the byte-fallback pieces
    ``<0x00>``..``<0xFF>``, and every later piece a normal piece whose score is its merge priority.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path = Path(path)
    pieces, scores = read_llama2c_vocab(path)
    expected_special = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    if len(pieces) < _N_SPECIAL + _N_BYTES or pieces[:_N_SPECIAL] != expected_special:
        raise UserError(
            f"{path} is not a llama2.c SentencePiece vocabulary: expected <unk>, <s>, </s> and 256 byte tokens "
            f"first, found {len(pieces)} tokens starting {pieces[:_N_SPECIAL]}"
        )
    Type = sp_pb2.ModelProto.SentencePiece.Type
    model = sp_pb2.ModelProto()
    seen = {}
    for i, (raw, score) in enumerate(zip(pieces, scores)):
        piece = model.pieces.add()
        piece.score = score
        if i < _N_SPECIAL:
            piece.piece = ("<unk>", "<s>", "</s>")[i]
            piece.type = Type.UNKNOWN if i == 0 else Type.CONTROL
            continue
        if i < _N_SPECIAL + _N_BYTES:
            expected = f"<0x{i - _N_SPECIAL:02X}>"
            if raw.decode("latin-1") != expected:
                raise UserError(f"{path}: token {i} should be the byte piece {expected}, found {raw!r}")
            piece.piece, piece.type = expected, Type.BYTE
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: token {i} is not valid UTF-8: {raw!r}") from None
        if not text:
            raise UserError(f"{path}: token {i} is empty")
        piece.piece, piece.type = text.replace(" ", _SPACE), Type.NORMAL
        if piece.piece in seen:
            raise UserError(f"{path}: tokens {seen[piece.piece]} and {i} are the same piece {text!r}")
        seen[piece.piece] = i

    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.ModelType.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.split_by_whitespace = True
    spec.allow_whitespace_only_pieces = True
    # llama2.c neither normalizes Unicode nor collapses runs of spaces: only the dummy prefix and " " -> "▁".
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def is_llama2c_vocab(path: Path) -> bool:
    """Whether ``path`` holds a llama2.c vocabulary rather than a SentencePiece model."""
    # A SentencePiece model is a protobuf whose first field is a piece (tag byte 0x0A); a llama2.c vocabulary
    # starts with a small little-endian int32 (max_token_length), so its first byte is never 0x0A in practice
    # (a max length of 10 would be; the suffix decides then).
    if path.suffix == ".bin":
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and head[0] != 0x0A and head[2:] == b"\0\0"


def resolve_tokenizer_path(path: Union[str, Path]) -> Path:
    """The tokenizer file of ``path``: the file itself, or in a folder ``tokenizer.model`` (preferred: LLaMA 1/2's
    SentencePiece model, also in our HF exports beside their ``tokenizer.json``), ``tokenizer.json`` or GPT-2's
    ``vocab.json`` (with ``merges.txt``)."""
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return path / TOKENIZER_FILE
        return bpe_source(path) or path / TOKENIZER_FILE
    return path


def has_tokenizer(folder: Union[str, Path]) -> bool:
    return resolve_tokenizer_path(folder).is_file() and Path(folder).is_dir()


def tokenizer_files(folder: Union[str, Path]) -> List[Path]:
    """The files of ``folder``'s tokenizer that a checkpoint keeps (``tokenizer.model``, or the BPE files present)."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return [folder / TOKENIZER_FILE]
    return [folder / name for name in HF_TOKENIZER_FILES if (folder / name).is_file()] if bpe_source(folder) else []


class Tokenizer:
    """Encodes text to token ids and back.

    ``path`` is a SentencePiece ``.model``, a llama2.c vocabulary (``tokenizer.bin``, ``tok512.bin``), a
    ``tokenizer.json`` / ``vocab.json`` or a checkpoint directory holding one (:func:`resolve_tokenizer_path`).
    """

    def __new__(cls, path: Union[str, Path]) -> "Tokenizer":
        # the backend follows the file's content, not its name: a tokenizer.json saved as "tok.model" is still one
        resolved = resolve_tokenizer_path(path)
        if cls is Tokenizer and resolved.is_file() and json_tokenizer_kind(resolved):
            return object.__new__(_BPETokenizer)
        return object.__new__(cls)

    def __init__(self, path: Union[str, Path]) -> None:
        from sentencepiece import SentencePieceProcessor

        path = resolve_tokenizer_path(path)
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path}")
        if isinstance(self, BPETokenizer):
            self._init_bpe(path)
            return
        self.path = path
        try:
            if is_llama2c_vocab(path):
                self.processor = SentencePieceProcessor(model_proto=llama2c_vocab_to_sentencepiece(path))
            else:
                self.processor = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"cannot load tokenizer {path}: {err}") from None
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()

    @classmethod
    def from_checkpoint_dir(cls, checkpoint_dir: Union[str, Path]) -> "Tokenizer":
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise UserError(f"checkpoint directory not found: {checkpoint_dir}")
        if not has_tokenizer(checkpoint_dir):
            raise UserError(f"{checkpoint_dir} has no {TOKENIZER_FILE} (SentencePiece) and no tokenizer.json or "
                            "vocab.json + merges.txt (BPE): the tokenizer of the checkpoint")
        return cls(checkpoint_dir)

    chat_template: Optional[str] = None
    """A SentencePiece tokenizer has no chat template (the BPE backend reads ``tokenizer_config.json``'s)."""

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def _finish(self, ids: List[int], bos: bool, eos: bool, max_length: int, device) -> torch.Tensor:
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        return self._finish(self.processor.encode(text), bos, eos, max_length, device)

    def encode_batch(
        self,
        texts: Sequence[str],
        bos: bool = True,
        eos: bool = False,
        max_length: int = -1,
        device: Optional[torch.device] = None,
    ) -> List[torch.Tensor]:
        """``encode`` for many texts at once (SentencePiece encodes the list in its own threads); unpadded."""
        return [self._finish(ids, bos, eos, max_length, device) for ids in self.processor.encode(list(texts))]

    def encode_pair(self, first: str, second: Optional[str] = None,
                    max_length: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, token_type_ids)`` of a text pair with the model's template: an encoder's tokenizer
        (RoBERTa's, :meth:`BPETokenizer.encode_pair`) has one; SentencePiece's LLaMA vocabularies have none."""
        raise UserError(f"the tokenizer {self.path} has no template for text pairs (SentencePiece, LLaMA): pairs are "
                        "encoded by an encoder's tokenizer (RoBERTa, BERT)")

    def token_spans(self, text: str) -> List[Tuple[int, int]]:
        """The ``(begin, end)`` UTF-8 byte offsets in ``text`` of each token of ``encode(text, bos=False)``.

        A character split into byte-fallback tokens has every byte token but the last one empty
        (``begin == end``), so each ``end`` is a character boundary: ``text.encode()[:end].decode()`` is safe.
        """
        try:
            encoded = self.processor.encode(text, out_type="proto")
        except ValueError:  # sentencepiece before 0.2.1 names the same object "immutable_proto"
            encoded = self.processor.encode(text, out_type="immutable_proto")
        return [(piece.begin, piece.end) for piece in encoded.pieces]

    def decode(self, ids: Union[torch.Tensor, List[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(ids)

    def decode_batch(self, batch: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return self.processor.decode([list(ids) for ids in batch])


class _BPETokenizer(BPETokenizer, Tokenizer):
    """A :class:`Tokenizer` on the ``tokenizers`` backend (what ``Tokenizer(path)`` returns for a BPE folder)."""
