"""CPU tier: the node classes' declared V1 interface (see nodes_support for how the pack is loaded)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from nodes_support import adapter, nodes, pack  # noqa: F401  (fixtures; tests/ is on pytest's pythonpath)

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


# ---------------------------------------------------------------------------------- declarations

def test_every_node_declares_a_consistent_v1_interface(pack, nodes, adapter):
    assert len(nodes) == 14          # 12 + the LoRA Loader (issue 12) + DiT to MODEL (issue 12)
    for node_id, cls in nodes.items():
        assert node_id.startswith("NewBie") and node_id == cls.__name__
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.TITLE and cls.TITLE.startswith("NewBie")
        assert cls.DESCRIPTION and cls.CATEGORY.split("/")[0] == "NewBie"
        fn = getattr(cls, cls.FUNCTION)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        json.dumps(spec)
        assert set(spec) <= {"required", "optional", "hidden"}
        params = inspect.signature(fn).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                typ, opts = entry[0], entry[1]
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
                assert takes_kwargs or name in params, f"{node_id}.{cls.FUNCTION} does not accept {name}"
                if section == "optional":
                    assert takes_kwargs or params[name].default is not inspect.Parameter.empty, (node_id, name)
                if isinstance(typ, list):
                    assert typ, f"{node_id}.{name}: empty combo"
                    assert "default" not in opts or opts["default"] in typ, (node_id, name)
                elif typ in WIDGETS and "default" in opts and typ in ("INT", "FLOAT"):
                    assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), (node_id, name)
    assert nodes["NewBieMemoryReport"].OUTPUT_NODE is True


def test_node_modules_never_import_comfyui_or_absolute_nodes():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|server|execution|nodes|latent_preview)\b", re.M)
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        if path.name == "comfy_adapter.py":
            continue
        assert not pattern.search(path.read_text()), f"{path.name} imports ComfyUI (only comfy_adapter may)"
