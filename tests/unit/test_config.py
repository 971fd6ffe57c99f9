"""config/config.yaml documents exactly the schema's defaults, which are the library's defaults."""

from __future__ import annotations

import inspect

import pytest
import yaml
from conftest import ROOT


def _schema_defaults(node):
    if node.get("type") == "object" or "properties" in node:
        return {k: _schema_defaults(v) for k, v in node.get("properties", {}).items()}
    return node.get("default")


@pytest.fixture(scope="module")
def schema():
    return yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())


def test_config_yaml_equals_schema_defaults(schema):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert config == _schema_defaults(schema)


def test_every_key_is_described(schema):
    def walk(node, path):
        for k, v in node.get("properties", {}).items():
            assert v.get("description"), f"{path}{k} has no description"
            if "properties" in v:
                walk(v, f"{path}{k}.")
            else:
                assert "default" in v, f"{path}{k} has no default"

    walk(schema, "")


@pytest.mark.parametrize(
    "section,func",
    [("texture_mask", "maskworks.em.texture:texture_mask"),
     ("postprocess_mask", "maskworks.em.postprocess:postprocess_mask")],
)
def test_schema_defaults_are_the_library_defaults(schema, section, func):
    import importlib

    mod, name = func.split(":")
    sig = inspect.signature(getattr(importlib.import_module(mod), name))
    defaults = _schema_defaults(schema)["em"][section]
    for key, value in defaults.items():
        assert key in sig.parameters, f"config key em.{section}.{key} is not a keyword of {func}"
        assert sig.parameters[key].default == value, (key, sig.parameters[key].default, value)
