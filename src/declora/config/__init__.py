"""The run configuration: a typed schema with every default, validated in one place before
any work; YAML files and dotted `--set` overrides."""

from declora.config.schema import RunConfig, load_config

__all__ = ["RunConfig", "load_config"]
