"""Training objectives: what a model is trained to predict (DESIGN §6, "objective").

The recipe's optional ``objective:`` section names one (``kind``; default ``next_token``)
with its settings. The objective owns its loss and its held-out metric; the training loop
calls ``train_forward`` / ``eval_batch`` and never branches on the kind.

* ``next_token``: next-token cross entropy (the default; no parameters);
* ``block_diffusion``: BD3-LM block diffusion (``block_diffusion.py``);
* ``ladir``: LaDiR's VAE / flow stages on reasoning data (``ladir.py``);
* ``forecast``: time-series forecasting with the ``ts_head`` (``forecast.py``).
"""

from typing import Any

from ..core import registry
from . import block_diffusion, forecast, ladir, next_token  # noqa: F401  (registration)
from .base import Objective


def objective_class(recipe: Any) -> type[Objective]:
    """The class of a recipe's objective (``next_token`` when it has none), before any model
    is built: what the trainer asks it (data, compile, phases) comes from here."""
    from ..core.recipe import objective_kinds

    obj = recipe.objective
    return registry.get(objective_kinds()[obj.kind] if obj is not None else "next_token").cls
