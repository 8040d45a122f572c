"""Config files: YAML read strictly (a key given twice is refused, not silently overridden) and the config
written back as YAML with its secrets redacted."""

from __future__ import annotations

import typing
from typing import Any

from lora_pipeline.config.schema import Config
from lora_pipeline.errors import ConfigError


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", field="--config") from None
    except IsADirectoryError:
        raise ConfigError(f"a directory, not a YAML file: {path}", field="--config") from None
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"cannot read {path}: {reason}", field="--config") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start}): {path}", field="--config") from None
    except ValueError:  # a NUL in the path: no file can have that name
        raise ConfigError(f"not a file name: {path!r}", field="--config") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{exc} (the second would silently win): {path}", field="--config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {path}", field="--config") from None
    except RecursionError:  # YAML nested thousands deep
        raise ConfigError(f"nested too deeply: {path}", field="--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections in {path}", field="--config")
    return data


class _DuplicateKey(Exception):
    """A mapping in a config file names one key twice."""


def _unique_key_loader() -> type:
    """yaml's SafeLoader, refusing a key given twice in one mapping: YAML would keep the last one without a
    word, so a config with `lora_r: 8` and, further down, `lora_r: 64` would train with 64. Merge keys (`<<`)
    still override, as YAML means them to."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice, at line {key_node.start_mark.line + 1}")
                if isinstance(key, typing.Hashable):
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def dump_yaml(config: Config) -> str:
    """The config as YAML, secrets redacted (it is printed and shared)."""
    import yaml

    from lora_pipeline.redaction import redact_config

    return yaml.safe_dump(redact_config(config.to_dict()), sort_keys=False)
