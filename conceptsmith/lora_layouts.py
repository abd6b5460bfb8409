"""The LoRA file layouts ConceptSmith writes, by name (:mod:`conceptsmith.lora_formats` converts to and from them).

Plain data, no torch: ``conceptsmith export-lora --format`` is checked here before anything heavy is imported.
"""

from __future__ import annotations

#: ``diffusers``: ``pipe.load_lora_weights``; ``kohya``: sd-scripts ``networks.lora`` (WebUI, ComfyUI).
LAYOUTS: tuple[str, ...] = ("diffusers", "kohya")
