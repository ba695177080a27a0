import json
import struct
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from lit_adapter.errors import UserError
from lit_adapter.data.tokenizer import Tokenizer, llama2c_vocab_to_sentencepiece, read_llama2c_vocab

TINYSTORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.",
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.",
    "Tom and his dog Max went to the beach. They built a big sandcastle and ate ice cream!",
    "The sun was shining. Birds sang: tweet, tweet... 123 + 456 = 579?",
]
EDGE_CASES = [
    "", " ", "a", "  two  leading spaces", "trailing   ", "tab\there", "line\nbreak\n\n", "café naïve über",
    "日本語のテキスト", "emoji 🙂👍", "<s> literal </s> <unk> <0x41>", "\x00\x01 control",
    "ＦＵＬＬＷＩＤＴＨ ﬁ",  # NFKC would change these; llama2.c does not normalize
]


def real_texts(shared_data: Path, n_dolly: int = 120, max_chars: int = 300) -> List[str]:
    texts = list(TINYSTORIES) + list(EDGE_CASES)
    records = json.loads((shared_data / "dolly" / "local_training_3.json").read_text())[:n_dolly]
    for r in records:
        texts += [r["instruction"], r["context"][:max_chars], r["response"][:max_chars]]
    for line in (shared_data / "instructions" / "self_instruct_seed_tasks.jsonl").read_text().splitlines()[:100]:
        task = json.loads(line)
        texts.append(task["instruction"])
        texts += [(i["input"] + "\n" + i["output"])[:max_chars] for i in task["instances"]]
    return texts


class Llama2cEncoder:
    """An independent pure-Python port of llama2.c's ``encode`` (run.c): dummy-prefix space, one token per UTF-8
    character or its bytes + 3, then merge the adjacent pair with the highest score (leftmost on ties)."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        self.pieces: List[bytes] = []
        self.scores: List[float] = []
        offset = 4
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            self.pieces.append(data[offset + 8 : offset + 8 + length])
            self.scores.append(score)
            offset += 8 + length
        self.lookup: Dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self.lookup.setdefault(piece, i)

    def encode(self, text: str) -> List[int]:
        ids = [self.lookup[b" "]] if text else []
        for ch in text:
            raw = ch.encode("utf-8")
            ids += [self.lookup[raw]] if raw in self.lookup else [b + 3 for b in raw]
        while True:
            best_score, best_at, best_id = -1e10, -1, -1
            for i in range(len(ids) - 1):
                merged = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_at, best_id = self.scores[merged], i, merged
            if best_at < 0:
                return ids
            ids[best_at : best_at + 2] = [best_id]


def export_llama2c_vocab(sp_model: Path, out: Path) -> None:
    """Writes a SentencePiece model in llama2.c's tokenizer.bin format, the way llama2.c's tokenizer.py does."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    records = []
    for i in range(sp.vocab_size()):
        piece = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i))
        records.append((piece.replace("\u2581", " ").encode("utf-8"), sp.get_score(i)))
    blob = struct.pack("<I", max(len(b) for b, _ in records))
    blob += b"".join(struct.pack("<fI", score, len(b)) + b for b, score in records)
    out.write_bytes(blob)


@pytest.fixture(scope="module")
def llama_tokenizer(shared_data):
    return Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")


def test_llama_tokenizer_reference_ids(llama_tokenizer):
    text = "Once upon a time, there was a little girl."
    ids = llama_tokenizer.encode(text)
    assert ids.dtype == torch.long
    assert ids.tolist() == [1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 29889]
    assert llama_tokenizer.encode(text, bos=False, eos=True).tolist()[-2:] == [29889, 2]
    assert llama_tokenizer.encode(text, max_length=3).tolist() == [1, 9038, 2501]
    assert llama_tokenizer.decode(ids) == text
    assert (llama_tokenizer.vocab_size, llama_tokenizer.bos_id, llama_tokenizer.eos_id) == (32000, 1, 2)


def test_encode_decode_batch(llama_tokenizer):
    texts = TINYSTORIES[:3] + [""]
    batch = llama_tokenizer.encode_batch(texts, bos=True, eos=True)
    assert [t.tolist() for t in batch] == [llama_tokenizer.encode(t, eos=True).tolist() for t in texts]
    assert llama_tokenizer.decode_batch(batch) == texts
    assert llama_tokenizer.decode_batch([[1, 9038, 2501], [2217]]) == ["Once upon", "little"]


def test_llama2c_vocab_becomes_sentencepiece_model(shared_data):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path = shared_data / "checkpoints" / "stories260K" / "tok512.bin"
    pieces, scores = read_llama2c_vocab(path)
    assert len(pieces) == 512 and pieces[259] == b" t" and scores[260] == -1.0
    model = sp_pb2.ModelProto()
    model.ParseFromString(llama2c_vocab_to_sentencepiece(path))
    Type = sp_pb2.ModelProto.SentencePiece.Type
    assert len(model.pieces) == 512
    assert [(p.piece, p.type) for p in model.pieces[:4]] == [
        ("<unk>", Type.UNKNOWN), ("<s>", Type.CONTROL), ("</s>", Type.CONTROL), ("<0x00>", Type.BYTE)
    ]
    assert model.pieces[258].piece == "<0xFF>" and model.pieces[259].piece == "\u2581t"
    assert [p.score for p in model.pieces[259:262]] == [0.0, -1.0, -2.0]
    assert model.trainer_spec.byte_fallback and model.normalizer_spec.name == "identity"
    assert not model.normalizer_spec.remove_extra_whitespaces


def test_llama2c_vocab_matches_llama2c_encoder_on_real_text(shared_data):
    path = shared_data / "checkpoints" / "stories260K" / "tok512.bin"
    tokenizer = Tokenizer(path)
    reference = Llama2cEncoder(path)
    texts = real_texts(shared_data)
    assert len(texts) > 500
    ours = [ids.tolist() for ids in tokenizer.encode_batch(texts, bos=False)]
    mismatches = [t for t, a in zip(texts, ours) if a != reference.encode(t)]
    assert mismatches == []
    # the tiny vocabulary falls back to bytes for most non-ASCII: make sure that path was exercised
    assert any(any(3 <= i < 259 for i in ids) for ids in ours)
    assert tokenizer.encode("Once upon a time").tolist() == [1, 403, 407, 261, 378]
    # decoding gives the text back exactly (byte fallback, spaces, newlines)
    assert tokenizer.decode_batch(ours) == texts


def test_llama2c_export_of_llama_vocab_reproduces_llama_tokenizer(shared_data, llama_tokenizer, tmp_path):
    exported = tmp_path / "tokenizer.bin"
    export_llama2c_vocab(shared_data / "tokenizers" / "llama" / "tokenizer.model", exported)
    rebuilt = Tokenizer(exported)
    assert rebuilt.vocab_size == 32000
    texts = real_texts(shared_data, n_dolly=400, max_chars=2000)
    expected = [t.tolist() for t in llama_tokenizer.encode_batch(texts)]
    assert [t.tolist() for t in rebuilt.encode_batch(texts)] == expected


def test_from_checkpoint_dir(shared_data, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((shared_data / "tokenizers/llama/tokenizer.model").read_bytes())
    assert Tokenizer.from_checkpoint_dir(tmp_path).encode("Once", bos=False).tolist() == [9038]
    assert Tokenizer(tmp_path).vocab_size == 32000


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer not found: .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(UserError, match="has no tokenizer.model"):
        Tokenizer.from_checkpoint_dir(tmp_path)
    with pytest.raises(UserError, match="checkpoint directory not found"):
        Tokenizer.from_checkpoint_dir(tmp_path / "missing")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x0a\x05garbage that is not a model")
    with pytest.raises(UserError, match="cannot load tokenizer .*corrupt.model"):
        Tokenizer(corrupt)
    truncated = tmp_path / "tok.bin"
    truncated.write_bytes(struct.pack("<ifi", 7, 0.0, 5) + b"<un")
    with pytest.raises(UserError, match="not a llama2.c tokenizer file"):
        Tokenizer(truncated)
    not_sp = tmp_path / "other.bin"
    not_sp.write_bytes(struct.pack("<i", 7) + b"".join(struct.pack("<fi", 0.0, 1) + b"a" for _ in range(300)))
    with pytest.raises(UserError, match="not a llama2.c SentencePiece vocabulary"):
        Tokenizer(not_sp)
