from . import forecast_decoding, ladir_decoding, mtp_decoding  # noqa: F401  (register the mtp, ladir and forecast modes in GENERATORS)
from .lm import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained, generation_config

__all__ = ["HybridLM", "ModelOutput", "build_model", "from_pretrained", "generation_config", "CheckpointError"]
