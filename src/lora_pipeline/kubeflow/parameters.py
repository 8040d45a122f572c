"""KFP inputs generated from the one config: pipeline parameters (`kfp` metadata) and component inputs.

Nothing here lists a parameter: names, types and defaults all come from `lora_pipeline.config.schema`.
The pipeline's parameters are the fields with a `kfp` name, in schema order. Each stage's component takes
its own section's options under shorter names: the training component uses the spec's `component` names
(`training_lora_r`), the other three use the field name (`data_uri`, `tasks`, `address`).
Options without a name for the component (this project's additions, e.g. `eval.include_path`) are not
inputs: `compile -c YAML` fixes them in the compiled component (`fixed_values`).
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.config import SECTIONS, Config, field_type, fields_of

# A component's pipeline-run inputs (Kfp.run_inputs) -> the env vars the register stage reads them from.
RUN_INPUTS = {"pipeline_run_id": "LORA_PIPELINE_KFP_RUN_ID", "pipeline_run_name": "LORA_PIPELINE_KFP_RUN_NAME"}


@dataclass(frozen=True)
class Parameter:
    """One KFP input: its name, the config field it fills, and its type and default in the compiled YAML."""

    name: str
    section: str
    field: str
    type: type  # str, int, float, bool, list or dict: what KFP maps to STRING, NUMBER_INTEGER, ...
    default: Any
    optional: bool = False  # declared `Optional[type] = None`

    @property
    def annotation(self) -> str:
        """The annotation as Python source, for the generated component function."""
        return f"Optional[{self.type.__name__}]" if self.optional else self.type.__name__


def plain_type(section: str, name: str) -> type:
    """The config field's type as KFP sees it: `str | None` -> str, `list[str]` -> list."""
    tp = field_type(section, name)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def pipeline_parameters(config: Config | None = None) -> list[Parameter]:
    """The pipeline's parameters: every field with a `kfp` name; defaults from `config` (the spec's by default)."""
    config = config or Config()
    return [
        Parameter(f.metadata["kfp"], section, f.name, plain_type(section, f.name), _value(config, section, f.name))
        for section in SECTIONS
        for f in fields_of(section)
        if "kfp" in f.metadata
    ]


def component_parameters(stage: str, config: Config | None = None) -> list[Parameter]:
    """The config inputs of one stage's component, in schema order.

    A stage with `spec_inputs` (train): every field with a `component` name, typed and defaulted as the spec's
    training component (`Optional[...] = None` where it says so). Other stages: the fields that are pipeline
    parameters.
    """
    config = config or Config()
    stage_row = table.BY_NAME[stage]
    section, spec = stage_row.section, stage_row.kfp.spec_inputs
    params = []
    for f in fields_of(section):
        name = f.metadata.get("component") if spec else (f.name if "kfp" in f.metadata else None)
        if name is None:
            continue
        # The spec's training component declares some inputs `Optional[...] = None`: None = the config's value.
        optional = spec and f.metadata.get("component_optional", False)
        default = None if optional else _value(config, section, f.name)
        params.append(Parameter(name, section, f.name, plain_type(section, f.name), default, optional))
    return params


def fixed_values(stage: str, config: Config) -> dict[str, Any]:
    """The stage section's options set off default by `config` that no input default can carry.

    These are the options that are not component inputs (e.g. `eval.include_path`,
    `train.micro_batch_size`) and the `Optional[...] = None` inputs (used when the input is None). They are
    written into the compiled component, so a pipeline compiled with `-c run.yaml` keeps them.
    """
    section = table.BY_NAME[stage].section
    inputs = {p.field for p in component_parameters(stage) if not p.optional}
    default = getattr(Config(), section)
    return {
        f.name: _value(config, section, f.name)
        for f in fields_of(section)
        if f.name not in inputs and getattr(getattr(config, section), f.name) != getattr(default, f.name)
    }


def _value(config: Config, section: str, name: str) -> Any:
    return copy.deepcopy(getattr(getattr(config, section), name))  # a default list is not shared


def stage_inputs(stage: str) -> dict[str, tuple[str, str]]:
    """Component input name -> (section, field), to turn a component's arguments back into a config layer."""
    return {p.name: (p.section, p.field) for p in component_parameters(stage)}
