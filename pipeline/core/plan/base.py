"""The plan's common ground: strict pydantic sections, YAML reading and errors that name the file and key.

Every section forbids unknown keys and checks types strictly (`"false"` is not a bool, `"1e-4"` is not a
float), so a typo or a wrong type in a recipe fails when the recipe is read, naming the key, the value and the
file, instead of inside a Ray worker hours later.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator


class Section(BaseModel):
    """Base of every plan section: strict types, unknown keys refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, validate_default=True)


def section_of(config_class: type, name: str) -> type[Section]:
    """A plan section made from a model config dataclass (e.g. an objective's): its fields, types and defaults are
    the dataclass's own, so the plan repeats no constant; validating the section runs the dataclass's checks, and
    `.config()` returns the dataclass instance the model code takes."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(config_class)}

    def check(self):
        self.config()  # the dataclass's own range checks (ValueError -> a validation error naming the section)
        return self

    def config(self):
        return config_class(**{name: getattr(self, name) for name in fields})

    section = create_model(name, __base__=Section,
                           __doc__=config_class.__doc__, __module__=__name__,
                           __validators__={"_check": model_validator(mode="after")(check)}, **fields)
    section.config = config
    section.config_class = config_class
    return section


def _custom_only(resources: dict[str, float]) -> dict[str, float]:
    builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(resources))
    if builtin:
        raise ValueError(f"resources {resources}: {builtin} have their own settings (cpus_per_*, *gpus*); "
                         "list only custom resources here, e.g. {worker_node: 1}")
    return resources


# Ray custom resources a step's tasks, actors or workers request on top of CPUs/GPUs (placement on labelled nodes).
CustomResources = Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_custom_only)]


class PlanError(ValueError):
    """A recipe or plan that does not validate; the message lists every bad key with its value."""


def describe_errors(err: ValidationError, where: str) -> str:
    """One line per error: `where: a.b.0.c = 'value': message`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top>"
        value = e.get("input")
        shown = "" if e["type"] == "missing" else f" = {value!r}"[:120]
        lines.append(f"{where}: {loc}{shown}: {e['msg']}")
    return "\n".join(lines)


def validate(cls: type[Section], data: Any, where: str) -> Any:
    """`cls.model_validate(data)`, with a PlanError naming `where`, every key and value on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise PlanError(describe_errors(e, where)) from None


# YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); recipes and overrides read it as the float it means.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT.pattern), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping; FileNotFoundError / ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PlanError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], text: str) -> None:
    """Apply one `a.b.0.c=value` override to a raw recipe dict in place (lists by index or by item name)."""
    if "=" not in text:
        raise PlanError(f"override {text!r} must look like path.to.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise PlanError(f"override {text!r} has an empty key in {dotted!r}")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as e:
        raise PlanError(f"override {text!r}: the value is not valid YAML: {e}") from None
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "<recipe>"
        if isinstance(node, list):
            index = _list_index(node, key, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise PlanError(f"override {text!r}: {where} is a {type(node).__name__}, not a section or list")


def _list_index(items: list, key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        i = int(key)
        if not -len(items) <= i < len(items):
            raise PlanError(f"override index {i} out of range for {where} (length {len(items)})")
        return i
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    if key not in names:
        raise PlanError(f"no item named {key!r} in {where}; names are {names}")
    return names.index(key)
