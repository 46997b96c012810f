"""newbie_core: NewBie-image-Exp0.1 inference that fits small GPUs.

A plain library: it never imports ComfyUI. ``python -m newbie_core generate`` runs it from the
command line; the pack's ``nodes/`` wrap the same pipeline for ComfyUI.
"""

__version__ = "0.1.0"
