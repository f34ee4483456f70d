from . import mtp_decoding  # noqa: F401  (registers generate(mode="mtp") in generation.GENERATORS)
from .lm import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained

__all__ = ["HybridLM", "ModelOutput", "build_model", "from_pretrained", "CheckpointError"]
