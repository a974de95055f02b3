"""fedtune: federated and privacy-preserving fine-tuning of language models."""

import os as _os

# Hub access is off unless the user opts in, so an accidental download fails loudly instead of
# hanging on a machine without internet. Must run before transformers/huggingface_hub import.
if _os.environ.get("FEDTUNE_ALLOW_HUB", "0") != "1":
    for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
