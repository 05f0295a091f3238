"""Results that survive a kill: an append-only JSONL of finished work units beside a run's output.

A run writes one line per finished unit (a batch of questions of one method, a batch of answers, a
calibrated configuration) as it goes, each flushed and fsynced. `--resume` reads them back, so a killed
run redoes only what it had not finished; the first line holds the run's settings, and a resume with
other settings is refused (its records would not mean the same). A line cut short by the kill is
dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def records_path(output: str | Path, suffix: str = ".records.jsonl") -> Path:
    """`results.json` -> `results.records.jsonl`: the records file beside an output."""
    out = Path(output)
    return out.with_name(out.stem + suffix) if out.suffix else out.with_name(out.name + suffix)


class RunRecords:
    """Finished units of one run, keyed by a string; `get(key)` returns a unit's value if a previous
    (killed) run finished it, `add(key, value)` records a unit the moment it is done."""

    def __init__(self, path: str | Path, settings: dict[str, Any], resume: bool):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        self.done: dict[str, Any] = {}
        if resume and self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n")
        self.resumed = len(self.done)

    def _load(self) -> None:
        raw = self.path.read_bytes()
        keep = raw[: raw.rfind(b"\n") + 1]  # a partial last line (killed mid-write) is dropped
        lines = keep.decode().splitlines()
        try:
            head = json.loads(lines[0])["settings"] if lines else None
        except (ValueError, KeyError, TypeError):
            head = None
        if head is None:
            raise ValueError(f"{self.path} is not a records file of this tool: delete it or drop --resume")
        if head != self.settings:
            diff = sorted(k for k in set(head) | set(self.settings) if head.get(k) != self.settings.get(k))
            raise ValueError(f"--resume: {self.path} was written with other settings ({', '.join(diff)}): run with "
                             "the same flags, or drop --resume to start over")
        for line in lines[1:]:
            rec = json.loads(line)
            self.done[rec["key"]] = rec["value"]
        if len(keep) != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))

    def get(self, key: str) -> Any | None:
        return self.done.get(key)

    def add(self, key: str, value: Any) -> None:
        self.done[key] = value
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
