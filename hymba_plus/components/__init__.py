"""Registered components. Importing this package registers every available one."""

from . import attention, mlp, none  # noqa: F401  (registration side effects)
