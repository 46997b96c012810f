"""Queue-time checks for node widgets (ComfyUI's ``VALIDATE_INPUTS``), through newbie_core.validate.

ComfyUI calls ``VALIDATE_INPUTS`` before it queues a prompt and shows the returned string beside
the node, so a width of 1000 is refused when the user presses Queue, not minutes later in the
sampler. Declaring a widget there turns off ComfyUI's own min/max check for it, so
:func:`widget_ranges` repeats those from ``INPUT_TYPES``. Linked inputs arrive as None and are
checked when they run.
"""

from __future__ import annotations

from collections.abc import Callable

from ..newbie_core.validate import InputError


def widget_ranges(node_class, values: dict) -> None:
    """min/max of every INT/FLOAT widget in ``values``, as INPUT_TYPES declares them."""
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            value = values.get(name)
            if value is None or entry[0] not in ("INT", "FLOAT") or len(entry) < 2:
                continue
            opts = entry[1]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(name, f"must be a number, got {value!r}.")
            if "min" in opts and value < opts["min"]:
                raise InputError(name, f"{value} is below the minimum {opts['min']}.")
            if "max" in opts and value > opts["max"]:
                raise InputError(name, f"{value} is above the maximum {opts['max']}.")


def queue_check(node_class, values: dict, *checks: Callable[[], object]) -> bool | str:
    """True, or the first problem as '<widget>: <what is wrong>' for ComfyUI's node error."""
    try:
        widget_ranges(node_class, values)
        for check in checks:
            check()
    except ValueError as e:       # InputError names the widget; PromptSyntaxError names line/column
        return str(e)
    return True
