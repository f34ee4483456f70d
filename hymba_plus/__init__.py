"""hymba_plus: a model zoo for hybrid language models built from YAML recipes."""

from . import components, objectives  # noqa: F401  (registers the components and the objectives)
from .core import registry
from .core.cache import HybridCache, LayerState, StepContext
from .core.recipe import OverrideError, Recipe, RecipeError, load_recipe
from .core.registry import register
from .models import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained

__version__ = "0.1.0"

__all__ = [
    "registry", "register", "load_recipe", "Recipe", "RecipeError", "OverrideError", "build_model", "from_pretrained",
    "HybridLM", "ModelOutput", "HybridCache", "LayerState", "StepContext", "CheckpointError",
]
