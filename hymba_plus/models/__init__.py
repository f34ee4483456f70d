from .lm import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained

__all__ = ["HybridLM", "ModelOutput", "build_model", "from_pretrained", "CheckpointError"]
