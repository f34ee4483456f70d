"""Registered components. Importing this package registers every available one:
attention (gated_attn / GA), mlp, none, gdn (Gated DeltaNet / GD), mamba3 (Mamba-3 / M3),
atlas (ATLAS neural memory / ATL), moe (mixture-of-experts channel mixer) and hymba
(Hymba parallel attention + SSM heads / HY, which imports the mixers it composes)."""

from . import atlas, attention, gdn, hymba, mamba3, mlp, moe, none  # noqa: F401  (registration side effects)
