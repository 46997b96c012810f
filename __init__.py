"""ComfyUI entry point of the NewBie Low-VRAM pack: node registration and nothing else."""

if __package__:
    # ComfyUI imports this folder as a package. pytest may also import this file on its own while
    # collecting a checkout whose folder name is not a valid package name (relative imports then
    # cannot work, and nothing needs the nodes there).
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# Frontend extension: the Memory Report shows its text on the canvas (js/newbie_report.js).
WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
