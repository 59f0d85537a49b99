"""What an initialization did to every key: loaded, reshaped, new (random) or dropped."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..checkpoint import atomic_write_text

Status = Literal["loaded", "reshaped", "new", "dropped"]


@dataclass
class KeyRecord:
    key: str                       # model key (for `dropped`: the file's key)
    status: Status
    shape: Optional[list[int]] = None
    source_shape: Optional[list[int]] = None
    note: str = ""


@dataclass
class InitReport:
    sources: dict[str, dict] = field(default_factory=dict)   # tower -> {path, format} or {random: True}
    records: list[KeyRecord] = field(default_factory=list)

    def add(self, key: str, status: Status, shape=None, source_shape=None, note: str = "") -> None:
        to_list = lambda s: None if s is None else [int(d) for d in s]  # noqa: E731
        self.records.append(KeyRecord(key, status, to_list(shape), to_list(source_shape), note))

    def counts(self) -> dict[str, int]:
        counted = Counter(r.status for r in self.records)
        return {status: counted.get(status, 0) for status in ("loaded", "reshaped", "new", "dropped")}

    def keys(self, status: Status) -> list[str]:
        return [r.key for r in self.records if r.status == status]

    def to_dict(self) -> dict:
        return {"sources": self.sources, "counts": self.counts(), "keys": [asdict(r) for r in self.records]}

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self):
        """A rich table: counts per tower, then every key that was not simply loaded."""
        from rich.table import Table

        table = Table(title="EVA-CLIP initialization")
        for column in ("key", "status", "shape", "from", "note"):
            table.add_column(column)
        for tower, source in self.sources.items():
            loaded = sum(1 for r in self.records if r.status == "loaded" and r.key.startswith(_PREFIX[tower]))
            origin = "random init" if source.get("random") else f"{source['path']} ({source['format']})"
            table.add_row(f"{_PREFIX[tower]}*", f"{loaded} loaded", "", origin, "")
        for r in self.records:
            if r.status != "loaded":
                table.add_row(r.key, r.status, _fmt(r.shape), _fmt(r.source_shape), r.note)
        return table


_PREFIX = {"vision": "visual.", "text": "text."}


def _fmt(shape: Optional[list[int]]) -> str:
    return "" if shape is None else "x".join(map(str, shape)) or "scalar"
