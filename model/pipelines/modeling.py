"""A family's network as a diffusers model: the network class itself, mixed with ModelMixin and ConfigMixin.

The diffusers class *is* the network (same modules, same parameter names, so an export's weights load unrenamed), and
its diffusers config is the family's config dataclass, field by field: `from_pretrained` rebuilds the network from
`config.json`, `save_pretrained` writes it. Only torch and diffusers are imported (bundled into exported folders).
"""
from __future__ import annotations

import dataclasses
import inspect

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


def diffusers_model(network_class: type, config_class: type, name: str, doc: str, module: str) -> type:
    """The class `name`: `network_class(config_class(**kwargs))` as a diffusers ModelMixin + ConfigMixin whose
    __init__ takes every field of `config_class` (with its default) as a keyword."""
    fields = dataclasses.fields(config_class)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          default=f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty)
        for f in fields]

    def __init__(self, **kwargs):
        # diffusers' configs store tuples as lists; the config dataclass wants its own types back.
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        network_class.__init__(self, config_class(**values))

    __init__.__signature__ = inspect.Signature(params)
    return type(name, (network_class, ModelMixin, ConfigMixin), {
        "__init__": register_to_config(__init__), "__doc__": doc, "config_name": "config.json",
        "_supports_gradient_checkpointing": False, "__module__": module})
