"""Every default is defined once, in the config dataclasses (configs/__init__.py, optimizers/__init__.py);
configs/base.yaml, configs/optimizers/*.yaml and the key tables of docs/config.md and docs/optimizers.md
restate them for readers, and these tests fail as soon as one of them drifts."""

import dataclasses
import os
import re

import pytest
import yaml

from configs import SECTIONS
from helpers import ROOT
from model import SpeedrunConfig
from optimizers import OPTIMIZERS, ScheduleConfig


def default(cls, dotted: str):
    """The default of a (possibly nested, `group_params.rank`) field of dataclass `cls`."""
    obj = cls()
    for part in dotted.split("."):
        assert part in {f.name for f in dataclasses.fields(obj)}, f"{cls.__name__} has no key {dotted}"
        obj = getattr(obj, part)
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def load_yaml(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return yaml.safe_load(f)


def flatten(d: dict, prefix="") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_base_yaml_states_the_dataclass_defaults():
    base = load_yaml("configs", "base.yaml")
    assert set(base) == set(SECTIONS)
    for section, values in base.items():
        for key, value in values.items():
            assert value == default(SECTIONS[section], key), f"configs/base.yaml {section}.{key}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_yaml_states_the_dataclass_defaults(name):
    for key, value in flatten(load_yaml("configs", "optimizers", f"{name}.yaml")).items():
        assert value == default(OPTIMIZERS[name].config, key), f"configs/optimizers/{name}.yaml {key}"


# The key tables: `| key | default | ... |` rows, each under a line naming what it describes.
def key_tables(path: str):
    """(what the table describes: the nearest line above it, or in docs/ the nearest heading,
    [(keys, default cell)]) per table."""
    with open(os.path.join(ROOT, path)) as f:
        lines = f.read().splitlines()
    tables = []
    for i, line in enumerate(lines):
        if re.match(r"\| key \| default \|", line):
            above = lines[i - 1::-1]
            title = next(line for line in above if (line.startswith("## ") if path == "docs/optimizers.md"
                                                    else line.strip() and not line.startswith("|")))
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                rows.append((re.findall(r"`([\w.]+)`", cells[0]), cells[1]))
            tables.append((title, rows))
    return tables


def split_values(cell: str, n: int) -> list[str]:
    """A default cell as one text per key: `a, b` lists split at top-level commas, `x{a,b}y` expanded,
    one text for all ("from preset") repeated."""
    text = cell.replace("`", "").strip()
    if n == 1 or text == "from preset":
        return [text] * (1 if n == 1 else n)
    brace = re.fullmatch(r"(.*)\{(.+)\}(.*)", text)
    if brace:
        return [brace[1] + alt + brace[3] for alt in brace[2].split(",")]
    return [part.strip() for part in re.split(r",\s*(?![^\[]*\])", text)]


def parse_value(text: str, expected):
    text = re.sub(r"\s*\(.*\)$", "", text)  # a remark: "null (false)"
    if text == "from preset":
        return None
    if isinstance(expected, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def described_class(title: str, path: str):
    if path == "docs/optimizers.md":
        return OPTIMIZERS[re.match(r"## (\w+)", title)[1]].config
    if title.startswith("Every optimizer"):
        return ScheduleConfig
    name = re.search(r"\(`(\w+)`", title)[1]
    return SECTIONS[name] if name in SECTIONS else OPTIMIZERS[name].config


@pytest.mark.parametrize("path", ["docs/config.md", "docs/optimizers.md"])
def test_key_tables_state_the_dataclass_defaults(path):
    tables = key_tables(path)
    assert len(tables) >= (8 if path == "docs/config.md" else 3)
    for title, rows in tables:
        cls = described_class(title, path)
        for keys, cell in rows:
            for key, text in zip(keys, split_values(cell, len(keys)), strict=True):
                expected = default(cls, key)
                value = parse_value(text, expected)
                if expected is None and value is not None and cls is SECTIONS["model"]:
                    expected = getattr(SpeedrunConfig, key)  # null: the architecture's own default, shown
                assert value == expected, f"{path}, table under {title!r}: {key} is {text!r}, the default {expected!r}"
