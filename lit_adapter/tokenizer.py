"""SentencePiece tokenizer for LLaMA-family checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch

from lit_adapter.errors import UserError


class Tokenizer:
    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path}")
        from sentencepiece import SentencePieceProcessor

        self.processor = SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, max_length: int = -1, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        ids: List[int] = self.processor.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: Union[torch.Tensor, List[int]]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.decode(ids)
