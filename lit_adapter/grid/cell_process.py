"""Runs one comparison cell's ``finetune/<method>.py`` process: keeps its whole output in a log, relays its progress
in one compact line, forwards Ctrl-C / SIGTERM to it once and enforces the cell's time limit.

The child prints a tqdm bar to stderr (``54/120 [00:10<00:12, 5.1step/s, loss=3.4521, tok_s=12,345]``) and a few
lines worth seeing as they happen (``validation loss ...``, ``resumed from ...``). Its raw output goes to
``run.log`` unchanged; the console gets ``[2/10 adapter_v2 @ 256] step 54/120, loss 3.4521, ETA 00:12``, rewritten
in place on a terminal and printed every :data:`PROGRESS_EVERY_S` seconds (and at the end) when stderr is a file.

The child runs in a session of its own, so a Ctrl-C at the terminal reaches only this process, which passes on
exactly one SIGINT: the training loop then finishes its step and writes a resumable ``last.ckpt``. (Had both
received the terminal's signal, forwarding it would have been the child's second signal, which stops it at once
without a checkpoint.) A second Ctrl-C is forwarded too and stops the child at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, TextIO

PROGRESS_EVERY_S = 30.0
"""How often the progress line is printed when stderr is not a terminal."""
TIMEOUT_GRACE_S = 60.0
"""How long a cell past its time limit gets to write its checkpoint after SIGTERM before it is killed."""

_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_LOSS = re.compile(r"loss=([-+\w.]+)")
# Child lines shown as they come (prefixed with the cell), besides the progress line.
_RELAYED = ("validation loss", "resumed from", "received SIG", "stopped at step")
# The run's closing summary: the grid prints its own line per cell (and an interrupted run's "after" is stale).
_NOT_RELAYED = ("validation loss: ",)


@dataclass
class ChildResult:
    returncode: Optional[int]
    """The exit status; ``None`` when the cell ran out of time."""
    interrupted: bool = False
    """The user stopped the grid (Ctrl-C or SIGTERM) while this cell ran."""


class _Relay:
    """Parses the child's output as it arrives, writes it to the log and prints the cell's progress."""

    def __init__(self, tag: str, log: TextIO, stream: TextIO) -> None:
        self.tag, self.log, self.stream = tag, log, stream
        self.tty = stream.isatty()
        self.partial = ""
        self.progress: Dict[str, str] = {}
        self.shown = ""  # the progress line last printed
        self.last_print = 0.0

    def feed(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()
        # tqdm redraws with "\r", everything else ends with "\n": both end a line here
        *lines, self.partial = re.split(r"[\r\n]", self.partial + text)
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        bar = _BAR.search(line) if ("step/s" in line or "s/step" in line) else None  # the training bar only
        if bar:
            step, total, _, eta = bar.groups()
            loss = _LOSS.search(line)
            self.progress = {"step": step, "total": total, "eta": eta, "loss": loss.group(1) if loss else ""}
            self._show_progress(force=False)
        elif any(marker in line for marker in _RELAYED) and not line.startswith(_NOT_RELAYED):
            self._print(f"{self.tag} {line.strip()}")

    def progress_line(self) -> str:
        p = self.progress
        if not p:
            return ""
        loss = f", loss {p['loss']}" if p["loss"] else ""
        return f"{self.tag} step {p['step']}/{p['total']}{loss}, ETA {p['eta']}"

    def _show_progress(self, force: bool) -> None:
        line = self.progress_line()
        if not line or line == self.shown:
            return
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
            self.shown = line
        elif force or time.monotonic() - self.last_print >= PROGRESS_EVERY_S:
            self._print(line)
            self.shown, self.last_print = line, time.monotonic()

    def _print(self, line: str) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")  # clear the progress line; it is redrawn by the next bar update
            self.shown = ""
        print(line, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = ""
        self._show_progress(force=True)
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def run_child(command: List[str], log_path: Path, tag: str, timeout_s: Optional[float], append: bool = False,
              stream: Optional[TextIO] = None) -> ChildResult:
    """Runs ``command`` to its end (or its time limit) and returns how it ended; see the module docstring.

    ``tag`` prefixes the relayed lines, ``append`` adds to ``log_path`` instead of replacing it (a resumed run),
    ``stream`` is where progress goes (default: ``sys.stderr`` at the time of the call)."""
    stream = sys.stderr if stream is None else stream
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a" if append else "w", encoding="utf-8", errors="replace") as log:
        if append:
            log.write(f"\n===== resumed {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        relay = _Relay(tag, log, stream)
        reader = threading.Thread(target=_pump, args=(proc, relay), daemon=True)
        reader.start()
        result = _wait(proc, timeout_s)
        reader.join()
        relay.finish()
    return result


def _pump(proc: subprocess.Popen, relay: _Relay) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        relay.feed(decoder.decode(chunk))
    relay.feed(decoder.decode(b"", final=True))
    proc.stdout.close()


def _wait(proc: subprocess.Popen, timeout_s: Optional[float]) -> ChildResult:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interrupted = timed_out = False
    previous = _sigterm_as_interrupt()
    try:
        while True:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                returncode = proc.wait(timeout=left)
                break
            except subprocess.TimeoutExpired:  # over the limit: let it save a checkpoint, then stop it
                timed_out = True
                deadline = None
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=TIMEOUT_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
            except KeyboardInterrupt:
                interrupted = True
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return ChildResult(None if timed_out else returncode, interrupted)


def _sigterm_as_interrupt():
    """Makes a SIGTERM to the grid act like Ctrl-C while a cell runs (so the cell checkpoints); returns the old
    handler, or ``None`` where none could be installed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here; leave SIGTERM alone
        return None
