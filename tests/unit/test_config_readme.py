"""config/README.md, which the Snakemake workflow catalog shows users as the configuration step,
names every config key of the schema (three levels deep) and every column of the three input tables,
and .snakemake-workflow-catalog.yml says what the workflow supports."""

from __future__ import annotations

import re

import yaml
from conftest import ROOT

README = (ROOT / "config" / "README.md").read_text()
TABLES = ["em_volumes", "cryoet_tomograms", "codex_images"]


def _keys(properties: dict, path: tuple = (), depth: int = 3):
    for key, spec in properties.items():
        yield (*path, key)
        if depth > 1 and "properties" in spec:
            yield from _keys(spec["properties"], (*path, key), depth - 1)


def test_every_config_key_is_described():
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    patterns = [re.compile(p.replace("*", r"\w*")) for p in re.findall(r"`(\*\w+|\w+\*)`", README)]
    missing = [".".join(path) for path in _keys(schema["properties"])
               if f"`{path[-1]}`" not in README and not any(p.fullmatch(path[-1]) for p in patterns)]
    assert not missing, f"config/README.md does not mention {missing}"
    for section in schema["properties"]:
        assert re.search(rf"^### `{section}`", README, re.M), section


def test_every_table_column_is_described_with_whether_it_is_required():
    for table in TABLES:
        schema = yaml.safe_load((ROOT / "config" / f"{table}.schema.yaml").read_text())
        section = README.split(f"### `config/{table}.tsv`", 1)[1].split("\n### ", 1)[0]
        for column in schema["properties"]:
            required = "required" if column in schema["required"] else "optional"
            assert f"| `{column}` | {required} |" in section, (table, column, required)
        header = (ROOT / "config" / f"{table}.tsv").read_text().splitlines()[0].split("\t")
        assert set(header) <= set(schema["properties"]), (table, header)


def test_catalog_settings():
    settings = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    n_rules = len(re.findall(r"^(?:rule|checkpoint) \w+:", rules, re.M))
    assert settings["software-stack-deployment"]["conda"]
    assert len(re.findall(r"^    conda:", rules, re.M)) == n_rules  # every rule names its env
    # a report: the Snakefile names its description and rules mark outputs for it
    assert settings["report"] is True
    assert re.search(r"^report: ", (ROOT / "Snakefile").read_text(), re.M) and "report(" in rules
    assert set(settings["mandatory-flags"]) == {"desc", "flags"}
