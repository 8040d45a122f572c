"""The one typed config: `schema` declares every parameter once; `loading` fills and validates it; `yaml_files`
reads and writes config files."""

from lora_pipeline.config.loading import (
    coerce,
    data_locations,
    from_dict,
    is_local_uri,
    local_path,
    parse_key_values,
    restore_secrets,
    validate,
)
from lora_pipeline.config.schema import (
    SECTIONS,
    Config,
    DatasetConfig,
    EvalConfig,
    RegistryConfig,
    TrainConfig,
    field_type,
    fields_of,
    kfp_parameters,
    kubernetes_only,
    output_options,
)
from lora_pipeline.config.yaml_files import dump_yaml, load_yaml

__all__ = [
    "SECTIONS",
    "Config",
    "DatasetConfig",
    "EvalConfig",
    "RegistryConfig",
    "TrainConfig",
    "coerce",
    "data_locations",
    "dump_yaml",
    "field_type",
    "fields_of",
    "from_dict",
    "is_local_uri",
    "kfp_parameters",
    "kubernetes_only",
    "load_yaml",
    "local_path",
    "output_options",
    "parse_key_values",
    "restore_secrets",
    "validate",
]
