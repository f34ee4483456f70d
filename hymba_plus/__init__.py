"""hymba_plus: a model zoo for hybrid language models built from YAML recipes."""

from . import components, objectives  # noqa: E402,F401  (registers the components and the objectives)
from .core import registry
from .core.cache import HybridCache, LayerState, StepContext  # noqa: E402
from .core.recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from .core.registry import register
from .models import CheckpointError, HybridLM, ModelOutput, build_model, from_pretrained  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "registry", "register", "load_recipe", "Recipe", "RecipeError", "build_model", "from_pretrained",
    "HybridLM", "ModelOutput", "HybridCache", "LayerState", "StepContext", "CheckpointError",
]
