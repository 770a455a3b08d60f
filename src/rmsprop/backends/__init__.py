"""Backends: each does only the math of one :class:`~rmsprop.rule.Rule` on lists of tensors.

A backend knows nothing about param groups or state dicts. Every backend has the signature of
:func:`rmsprop.backends.single.rmsprop_single` and is chosen in :mod:`rmsprop.functional`.
"""
