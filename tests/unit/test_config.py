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


# config section -> the functions whose keywords it sets; keys handled by the workflow itself.
SECTIONS = [
    ("em", "texture_mask", ["maskworks.em.texture:texture_mask", "maskworks.em.stages:texture_mask_files"],
     {"threads"}),
    ("em", "postprocess_mask", ["maskworks.em.postprocess:postprocess_mask",
                                "maskworks.em.stages:postprocess_mask_files"], {"threads"}),
    ("cryoet", "extract_patches",
     ["maskworks.cryoet.patches:iter_patches", "maskworks.cryoet.stages:extract_patches_files"], set()),
    ("cryoet", "merge_corrections",
     ["maskworks.cryoet.corrections:merge_corrections", "maskworks.cryoet.stages:merge_corrections_files"], set()),
    ("cryoet", "export_training", ["maskworks.cryoet.stages:export_training_files"], {"enabled"}),
    ("cryoet", "refine_membranes",
     ["maskworks.cryoet.refine:refine_membranes", "maskworks.cryoet.stages:refine_membranes_files"],
     {"copick_config", "runs", "runs_per_job", "qc_pictures", "org_info", "mem_info"}),
    ("em", "train_unet", ["maskworks.em.unet:train_unet", "maskworks.em.stages:train_unet_files"],
     {"enabled", "training", "images_dir", "labels_dir"}),
    ("em", "predict_unet", ["maskworks.em.unet:predict_volume", "maskworks.em.stages:predict_unet_files"],
     {"threads"}),
    ("codex", "tile_image", ["maskworks.codex.stages:tile_image_files"], set()),
    ("codex", "segment_cells", ["maskworks.codex.stages:segment_cells_files"], {"device", "watershed", "expansion"}),
    ("codex", "stitch", ["maskworks.codex.stages:stitch_files"], set()),
    ("codex", "quantify", ["maskworks.codex.stages:quantify_files"], set()),
    ("codex", "spatialdata", ["maskworks.codex.spatial:write_spatialdata_files"], {"enabled"}),
]


@pytest.mark.parametrize("arm,section,funcs,workflow_keys", SECTIONS, ids=[s[1] for s in SECTIONS])
def test_schema_defaults_are_the_library_defaults(schema, arm, section, funcs, workflow_keys):
    import importlib

    params = {}
    for func in funcs:
        mod, name = func.split(":")
        params.update(inspect.signature(getattr(importlib.import_module(mod), name)).parameters)
    defaults = _schema_defaults(schema)[arm][section]
    for key, value in defaults.items():
        if key in workflow_keys:
            continue
        assert key in params, f"config key {arm}.{section}.{key} is not a keyword of {funcs}"
        default = params[key].default
        default = list(default) if isinstance(default, tuple) else default
        if key == "roi_size" and isinstance(default, list) and len(set(default)) == 1:
            default = default[0]  # the config's one number means a cube
        assert default == value or (default is None and value == {}), (key, default, value)


# The keywords of a schema node that say what a value may be (the rest is description and default).
RANGE_KEYS = ("type", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
              "items", "minItems", "maxItems", "oneOf")


def _ranges(node):
    return {k: node[k] for k in RANGE_KEYS if k in node}


def _section_specs(funcs):
    import importlib

    from maskworks.io.params import specs_of

    specs = {}
    for func in funcs:
        mod, name = func.split(":")
        specs.update(specs_of(getattr(importlib.import_module(mod), name)))
    return specs


@pytest.mark.parametrize("arm,section,funcs,workflow_keys", SECTIONS, ids=[s[1] for s in SECTIONS])
def test_schema_ranges_are_the_library_ranges(schema, arm, section, funcs, workflow_keys):
    """Every config key's type and range is exactly what the library checks (maskworks.io.params),
    so a value the schema lets through is one the stage accepts, and the reverse."""
    specs = _section_specs(funcs)
    node = schema["properties"][arm]["properties"][section]["properties"]
    keys = [k for k in node if k not in workflow_keys and "properties" not in node[k]]
    wrong = {k: (_ranges(node[k]), specs[k].schema() if k in specs else None)
             for k in keys if k not in specs or _ranges(node[k]) != specs[k].schema()}
    assert not wrong, "schema ranges (left) differ from the library's (right):\n" + \
        "\n".join(f"  {arm}.{section}.{k}: {a} != {b}" for k, (a, b) in wrong.items())


def test_watershed_ranges_are_the_library_ranges(schema):
    specs = _section_specs(["maskworks.codex.segment:segment_watershed"])
    node = schema["properties"]["codex"]["properties"]["segment_cells"]["properties"]["watershed"]["properties"]
    assert {k: _ranges(v) for k, v in node.items()} == {k: specs[k].schema() for k in node}


def test_watershed_defaults_are_the_library_defaults(schema):
    from maskworks.codex.segment import segment_watershed

    sig = inspect.signature(segment_watershed).parameters
    for key, value in _schema_defaults(schema)["codex"]["segment_cells"]["watershed"].items():
        assert sig[key].default == value, key


def test_expansion_ranges_and_defaults_are_the_library_ones(schema):
    from maskworks.codex.stages import backend_params

    specs = _section_specs(["maskworks.codex.stages:segment_cells_files"])
    node = schema["properties"]["codex"]["properties"]["segment_cells"]["properties"]["expansion"]["properties"]
    assert {k: _ranges(v) for k, v in node.items()} == {k: specs[k].schema() for k in node}
    assert _schema_defaults(schema)["codex"]["segment_cells"]["expansion"] == backend_params("expansion")
