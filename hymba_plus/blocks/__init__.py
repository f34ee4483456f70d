from .block import Block

__all__ = ["Block"]
