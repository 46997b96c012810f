"""The pack's ComfyUI node classes (V1 API). Display names come from each class's TITLE."""

from .encode_node import NewBieTextEncode
from .latent_node import NewBieEmptyLatent
from .loaders import NewBieDiTLoader, NewBieLoraLoader, NewBieTextEncoderLoader, NewBieVAELoader
from .model_node import NewBieDiTToModel
from .prompt_nodes import NewBieCharacter, NewBieXMLPromptBuilder
from .report_node import NewBieMemoryReport
from .sampler_node import NewBieSampler
from .settings_node import NewBieMemorySettings
from .vae_nodes import NewBieVAEDecode, NewBieVAEEncode

NODE_CLASSES = [
    NewBieDiTLoader, NewBieTextEncoderLoader, NewBieVAELoader, NewBieMemorySettings, NewBieCharacter,
    NewBieXMLPromptBuilder, NewBieTextEncode, NewBieEmptyLatent, NewBieSampler, NewBieVAEDecode,
    NewBieVAEEncode, NewBieMemoryReport, NewBieLoraLoader, NewBieDiTToModel,
]

# The key is the class_type in saved workflows: never rename one once published.
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS = {name: cls.TITLE for name, cls in NODE_CLASS_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
