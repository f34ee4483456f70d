from . import ladir_decoding, mtp_decoding  # noqa: F401  (register the mtp and ladir modes in GENERATORS)
from .lm import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained

__all__ = ["HybridLM", "ModelOutput", "build_model", "from_pretrained", "CheckpointError"]
