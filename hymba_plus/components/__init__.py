"""Registered components. Importing this package registers every available one."""

from . import attention, mlp, none  # noqa: F401  (registration side effects)
from . import gdn  # noqa: F401,E402  (Gated DeltaNet: gdn / GD)
from . import mamba3  # noqa: F401,E402  (Mamba-3: mamba3 / M3)
from . import atlas  # noqa: F401,E402  (ATLAS neural memory: atlas / ATL)
from . import moe  # noqa: F401,E402  (mixture of experts channel mixer: moe)
from . import hymba  # noqa: F401,E402  (Hymba parallel attention + SSM heads: hymba / HY)
