"""A session's trajectory log (JSONL) and its replay, after DSec.

Line 1: {"type": "session", "session_id", "image", "time"}; then one line per call:
{"type": "call", "seq", "op", "args", "result"}; a finished episode ends with {"type": "close"}.

Resuming: a worker that died mid-episode reopens the same file. The pool still holds the
session's container (its lease outlives the worker), so the sandbox state is intact; the new
worker re-issues its calls from the start, and the first `len(log)` of them are answered from the
log instead of being run again. That is what keeps a non-idempotent command (`echo x >> f`,
a `pip install`, a git commit) from running twice. A call that was running when the worker died
has no logged result and does run again: the one unavoidable gap.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sandbox.container import SandboxError


class Trajectory:
    """Append-only JSONL log of one session, loaded for replay if the file already exists."""

    def __init__(self, path: Path):
        self.path = path
        self.session_id: str | None = None
        self.closed = False
        self.replay: list[dict] = []  # logged calls not yet re-issued by a resumed worker
        if path.exists():
            lines = path.read_text().splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines):
                        break  # a torn last line from a worker killed mid-write: drop it
                    raise SandboxError(f"{path}:{n}: not valid JSON") from None
                if rec.get("type") == "session":
                    self.session_id = rec["session_id"]
                elif rec.get("type") == "call":
                    self.replay.append(rec)
                elif rec.get("type") == "close":
                    self.closed = True
        self._next = 0
        self._seq = len(self.replay) - 1

    def start(self, session_id: str, image: str) -> None:
        self.session_id = session_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._write({"type": "session", "session_id": session_id, "image": image, "time": time.time()})

    def restart(self, session_id: str) -> None:
        """The same episode continues in a new session (rebuilt after its pool died); the log goes on."""
        self.session_id = session_id
        self._write({"type": "session", "session_id": session_id, "rebuilt": True, "time": time.time()})

    def skip_replay(self) -> None:
        """Mark every logged call as already seen by the caller: new calls are executed and appended."""
        self._next = len(self.replay)

    def has_replay(self) -> bool:
        return self._next < len(self.replay)

    def replay_next(self, op: str, args: dict) -> Any:
        """The logged result of the next call; the call must be the one that was logged."""
        rec = self.replay[self._next]
        if rec["op"] != op or rec["args"] != _jsonable(args):
            raise SandboxError(
                f"{self.path}: resumed episode diverged at call {rec['seq']}: logged {rec['op']} "
                f"{rec['args']}, now {op} {args}")
        self._next += 1
        return rec["result"]

    def append(self, op: str, args: dict, result: Any) -> None:
        self._seq += 1
        self._write({"type": "call", "seq": self._seq, "op": op, "args": _jsonable(args), "result": result})

    def close(self) -> None:
        self._write({"type": "close", "time": time.time()})
        self.closed = True

    def _write(self, rec: dict) -> None:
        # One write per line and a flush: a killed worker loses at most the line it was writing.
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def _jsonable(args: dict) -> dict:
    return json.loads(json.dumps(args))
