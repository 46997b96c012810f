"""Memory Report: shows the plans and measured per-stage peaks that came through the graph."""

from __future__ import annotations

import logging

from .types import CATEGORY, NEWBIE_REPORT, StageReport

log = logging.getLogger(__name__)


class NewBieMemoryReport:
    TITLE = "NewBie Memory Report"
    DESCRIPTION = ("Shows what each stage planned (resident/streamed blocks, chunks, predicted peak) beside what it "
                   "measured (time, peak VRAM, host RAM). Connect the sampler's and the VAE decode's reports.")
    CATEGORY = f"{CATEGORY}/memory"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The report as text.",)
    OUTPUT_NODE = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "sampler_report": (NEWBIE_REPORT, {"tooltip": "Report output of NewBie Next-DiT Sampler."}),
            "vae_report": (NEWBIE_REPORT, {"tooltip": "Report output of NewBie Offloaded VAE Decode."}),
        }}

    def show(self, sampler_report: StageReport | None = None, vae_report: StageReport | None = None) -> dict:
        reports = [r for r in (sampler_report, vae_report) if r is not None]
        for r in reports:
            if not isinstance(r, StageReport):
                raise ValueError("report inputs must come from NewBie nodes' report outputs.")
        merged = StageReport()
        for r in reports:
            merged = merged.merged(r)
        text = merged.render() if reports else "(connect a NewBie report output)"
        log.info("NewBie memory report:\n%s", text)
        return {"ui": {"text": [text]}, "result": (text,)}
