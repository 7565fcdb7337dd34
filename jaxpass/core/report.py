"""What each pass matched, changed, skipped and fell back on: ``t.report``."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpass.core.interpreter import Event


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@dataclasses.dataclass
class ParamChange:
    """One parameter a pass replaced."""

    path: str
    before: str          # e.g. "f32[576,1536]"
    after: str           # e.g. "int8[576,1536] + f32[1,1536] scale"
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass
class PassReport:
    """The report of one pass."""

    name: str
    config: str
    changed: list[ParamChange] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (what, why)
    matched_ops: list[str] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    output_error: float | None = None     # relative L2 error of outputs on the example inputs

    @property
    def bytes_before(self) -> int:
        return sum(c.bytes_before for c in self.changed)

    @property
    def bytes_after(self) -> int:
        return sum(c.bytes_after for c in self.changed)

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "config": self.config,
            "changed": [dataclasses.asdict(c) for c in self.changed],
            "skipped": [{"what": w, "why": y} for w, y in self.skipped],
            "matched_ops": list(self.matched_ops),
            "events": [dataclasses.asdict(e) for e in self.events],
            "notes": list(self.notes),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "output_error": self.output_error,
        }

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.config}"]
        if self.changed:
            lines.append(f"  changed {len(self.changed)} params: {fmt_bytes(self.bytes_before)} -> "
                         f"{fmt_bytes(self.bytes_after)}")
            for c in self.changed:
                lines.append(f"    {c.path}: {c.before} -> {c.after}")
        if self.matched_ops:
            lines.append(f"  rewrote {len(self.matched_ops)} ops")
            for m in self.matched_ops:
                lines.append(f"    {m}")
        for kind, title in (("rewrite", "rewrites"), ("materialize", "fallbacks (dense)"),
                            ("boundary", "region boundaries")):
            evs = self.events_of(kind)
            if evs:
                lines.append(f"  {title}: {len(evs)}")
                for e in evs:
                    lines.append(f"    {e.op}" + (f" [{e.param}]" if e.param else "") +
                                 (f": {e.detail}" if e.detail else ""))
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            for w, y in self.skipped:
                lines.append(f"    {w}: {y}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.output_error is not None:
            lines.append(f"  output relative error on example inputs: {self.output_error:.3e}")
        return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """Per-pass reports, in pass order."""

    passes: list[PassReport] = dataclasses.field(default_factory=list)
    params_bytes_before: int = 0
    params_bytes_after: int = 0

    def __iter__(self):
        return iter(self.passes)

    def __len__(self):
        return len(self.passes)

    def __getitem__(self, i) -> PassReport:
        return self.passes[i]

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [p.to_dict() for p in self.passes],
                "params_bytes_before": self.params_bytes_before,
                "params_bytes_after": self.params_bytes_after}

    def __str__(self) -> str:
        head = (f"jaxpass report: params {fmt_bytes(self.params_bytes_before)} -> "
                f"{fmt_bytes(self.params_bytes_after)}")
        if not self.passes:
            return head + "\n(no passes: identity)"
        return "\n".join([head] + [str(p) for p in self.passes])
