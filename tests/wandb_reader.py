"""Reads an offline WandB run back: the records of its ``run-*.wandb`` file, parsed with wandb's own protobuf.

wandb 0.31 writes the file from its Go core and no longer ships the Python ``DataStore`` reader; the file is a
LevelDB log (32 KiB blocks of records with a 7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) behind a
7-byte W&B header, each record a ``wandb_internal_pb2.Record``. This is the transaction log ``wandb sync``
uploads, so what it holds is what the dashboard will show.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, List

BLOCK = 32 * 1024
HEADER = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> List[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == HEADER, f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def read_finished(path: Path, timeout: float = 30.0) -> List[Any]:
    """The records of a finished run. ``run.finish()`` returns before wandb's core has flushed the file (it writes
    it whole a moment later, and at the latest when the process exits), so wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


class OfflineRun:
    """What one offline run folder (``wandb/offline-run-*``) holds, as plain Python values."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        (log,) = self.folder.glob("run-*.wandb")
        self.records = read_finished(log)
        kinds = lambda name: [r for r in self.records if r.WhichOneof("record_type") == name]  # noqa: E731
        (self.run,) = [r.run for r in kinds("run")]
        self.config: Dict[str, Any] = {}
        for update in [r.run.config.update for r in kinds("run")] + [r.config.update for r in kinds("config")]:
            for item in update:
                self.config[item.key or item.nested_key[0]] = json.loads(item.value_json)
        self.summary: Dict[str, Any] = {}
        for r in kinds("summary"):
            for item in r.summary.update:
                keys = list(item.nested_key) or [item.key]
                target = self.summary
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                target[keys[-1]] = json.loads(item.value_json)
        # a row's keys: "trainer/global_step" is one key; a table's fields are nested under its key
        self.history = [{(i.key or i.nested_key[0]): json.loads(i.value_json) for i in r.history.item
                         if len(i.nested_key) <= 1} for r in kinds("history")]
        self.metrics = [r.metric for r in kinds("metric")]
        self.artifacts = [r.artifact for r in kinds("artifact")]
        self.exit_codes = [r.exit.exit_code for r in kinds("exit")]

    def table(self, key: str) -> Dict[str, Any]:
        """The ``wandb.Table`` logged under ``key``: its file in the run's media folder."""
        path = self.summary[key]["path"]
        return json.loads((self.folder / "files" / path).read_text())


def offline_runs(out_dir: Path) -> List[OfflineRun]:
    return [OfflineRun(folder) for folder in sorted(Path(out_dir).glob("wandb/offline-run-*"))]
