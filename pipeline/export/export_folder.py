"""An export folder (what training or `import-weights` writes): config.json beside model.safetensors and
ema.safetensors. config.json names the family, the network, the objective with its constants, the encoders (and the
text-encoding mode), the sampler defaults and the step; `Export` is that, read and checked once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model import family as families
from model.family import DEFAULT as DEFAULT_FAMILY
from model.objectives.configs import config_from_dict as objective_config
from pipeline.core import storage

WEIGHTS = {False: "model.safetensors", True: "ema.safetensors"}
CONFIG_NAME = "config.json"
# Exports written before the family interface recorded neither family nor objective: they are MicroDiT + EDM.
LEGACY_EXPORT = {"family": DEFAULT_FAMILY, "objective": {"kind": "edm"}}  # EDM's own constants (configs.py)
# Exports written before the text mode was recorded stored E-MMDiT's caption states compactly.
LEGACY_TEXT_MODE = "compact"


@dataclass(frozen=True)
class Export:
    """A checked export: where its weights are, and what config.json says."""

    folder: str
    weights: str  # the safetensors URI drawn with (model or EMA)
    config: dict[str, Any]
    family: families.Family
    model: Any  # the family's network config
    objective: Any  # the objective config, all constants
    use_ema: bool

    @property
    def encoders(self) -> dict[str, Any]:
        return self.config.get("encoders") or {}

    @property
    def text_mode(self) -> str:
        """How caption states were computed ("release" or "compact"; model/pipelines/emmdit.py)."""
        return self.encoders.get("text_mode") or LEGACY_TEXT_MODE

    @property
    def sampler(self) -> dict[str, Any]:
        """Steps and guidance the model was trained or released with (the family's when the export has none)."""
        s = self.config.get("sampler") or {}
        return {"steps": s.get("steps") or self.family.sampler.steps,
                "guidance": self.family.sampler.guidance if s.get("guidance") is None else s["guidance"]}

    @property
    def step(self) -> int | None:
        return self.config.get("step")


def read_export_config(config_uri: str) -> dict:
    """An export's config.json, legacy fields filled; ValueError if it is not one."""
    config = storage.read_json(config_uri)
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{config_uri!r} has no 'model' section; expected an export config "
                         "{'family', 'model', 'objective', 'encoders', 'sampler', ...}")
    if "family" not in config:
        config = {**LEGACY_EXPORT, **config}
    return config


def locate(uri: str, use_ema: bool) -> tuple[str, str]:
    """(folder, weights URI): `uri` is an export folder or a .safetensors file in one; FileNotFoundError naming
    what is missing."""
    uri = str(uri).rstrip("/")
    if uri.endswith(".safetensors"):
        folder, weights = (uri.rsplit("/", 1)[0] if "/" in uri else "."), uri
    else:
        folder, weights = uri, storage.join(uri, WEIGHTS[use_ema])
    if not storage.exists(storage.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(f"{storage.join(folder, CONFIG_NAME)!r} does not exist; expected an export folder "
                                f"({CONFIG_NAME} beside {WEIGHTS[False]} / {WEIGHTS[True]})")
    if not storage.exists(weights):
        raise FileNotFoundError(f"weights {weights!r} do not exist; expected an export folder holding "
                                f"{WEIGHTS[use_ema]} (use_ema={use_ema}) or a .safetensors file")
    return folder, weights


def open_export(uri: str, use_ema: bool = False) -> Export:
    """The export at `uri` (a folder or a .safetensors file in one), its config checked: ValueError naming an unknown
    family, a network config that does not fit the family, or an unknown objective."""
    folder, weights = locate(uri, use_ema)
    config_uri = storage.join(folder, CONFIG_NAME)
    config = read_export_config(config_uri)
    try:
        family = families.get(config["family"])
    except ValueError as e:
        raise ValueError(f"{config_uri}: {e}") from None
    try:
        model = family.config_from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_uri}: model: {e}") from None
    try:
        objective = objective_config(config["objective"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_uri}: objective: {e}") from None
    if objective.kind not in family.objectives:
        raise ValueError(f"{config_uri}: objective {objective.kind!r} is not one of {family.name}'s "
                         f"{list(family.objectives)}")
    return Export(folder, weights, config, family, model, objective, use_ema)
