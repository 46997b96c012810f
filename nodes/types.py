"""Socket type names and the report object that travels between the pack's nodes.

A custom type is just a string to ComfyUI: sockets connect only to the same string, and the
value is whatever Python object the producer returned (comfyui-notes §1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..newbie_core.placement import Report, StageRecord

NEWBIE_DIT = "NEWBIE_DIT"                         # pipeline.DiTHandle
NEWBIE_TEXT_ENCODERS = "NEWBIE_TEXT_ENCODERS"     # pipeline.TextEncoderHandle (Gemma + Jina)
NEWBIE_VAE = "NEWBIE_VAE"                         # pipeline.VaeHandle
NEWBIE_MEMORY = "NEWBIE_MEMORY"                   # pipeline.MemorySettings
NEWBIE_REPORT = "NEWBIE_REPORT"                   # StageReport (below)
NEWBIE_CHARACTER = "NEWBIE_CHARACTER"             # tuple[prompt.Character, ...]

CATEGORY = "NewBie"
CNR_ID = "comfyui-newbie-lowvram"                 # properties.cnr_id in the bundled workflows


@dataclass(frozen=True)
class StageReport:
    """What one or more stages planned and measured. Immutable, so a cached node output can be
    shared by several downstream nodes without one run's numbers leaking into another."""
    plans: tuple[tuple[str, str], ...] = ()        # (stage, rendered plan)
    records: tuple[StageRecord, ...] = ()          # measured time and peaks, in run order
    notes: tuple[str, ...] = ()                    # one line per stage: device and budget

    @classmethod
    def from_run(cls, stage: str, plan_text: str, report: Report, note: str) -> "StageReport":
        return cls(((stage, plan_text),), tuple(report.records), (note,))

    def merged(self, other: "StageReport | None") -> "StageReport":
        if other is None:
            return self
        return StageReport(self.plans + other.plans, self.records + other.records, self.notes + other.notes)

    def render(self) -> str:
        parts = list(self.notes)
        parts += [f"== plan: {stage} ==\n{text}" for stage, text in self.plans]
        if self.records:
            parts.append("== measured ==\n" + Report(list(self.records)).render())
        return "\n\n".join(parts) if parts else "(empty report)"
