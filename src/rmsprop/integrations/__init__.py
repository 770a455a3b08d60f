"""Glue for frameworks that look optimizers up by name.

Lightning, Hugging Face ``Trainer`` and Stable-Baselines3 take an optimizer class or instance and
need no glue (see ``examples/``); timm's ``create_optimizer_v2`` finds optimizers in a registry of
names, which :func:`rmsprop.integrations.timm.register_timm` fills. Nothing here is imported by
``import rmsprop``, and none of these frameworks is a dependency.
"""
