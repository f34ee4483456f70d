"""Registered components. Importing this package registers every available one:
attention (gated_attn / GA), mlp, none, gdn (Gated DeltaNet / GD), mamba3 (Mamba-3 / M3),
atlas (ATLAS neural memory / ATL), moe (mixture-of-experts channel mixer), hymba
(Hymba parallel attention + SSM heads / HY, which imports the mixers it composes) and
etd_router (the controller of ETD models: adaptive think iterations, Dr.LLM layer routes,
MoDr LoRA branches), mtp (multi-token prediction modules, ``model.mtp``) and ladir (latent
reasoning: VAE + flow matching over memory slots, the recipe's ``ladir`` section) and
ts_head (the time-series forecasting head of the ``forecast`` objective)."""

from . import atlas, attention, etd_router, gdn, hymba, ladir, mamba3, mlp, moe, mtp, none, ts_head  # noqa: F401  (registration)
