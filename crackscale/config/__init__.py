"""Typed, strict job configs: ``loader`` (YAML + ``--set`` overrides → frozen, validated dataclasses,
and ``setting``, the help text every key carries), one module per config: ``storage``, ``train``,
``score``, ``tune``. docs/configuration.md is generated from them."""
