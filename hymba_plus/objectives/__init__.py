"""Training objectives: what a model is trained to predict (DESIGN §6, "objective").

The recipe's optional ``objective:`` section names one (``kind``; default ``next_token``)
with its settings. The objective owns its loss and its held-out metric; the training loop
calls ``train_forward`` / ``eval_batch`` and never branches on the kind.

* ``next_token``: next-token cross entropy (the default; no parameters);
* ``block_diffusion``: BD3-LM block diffusion (``block_diffusion.py``);
* ``ladir``: LaDiR's VAE / flow stages on reasoning data (``ladir.py``).
"""

from . import block_diffusion, ladir, next_token  # noqa: F401  (registration)
