"""The import-linter contracts (pyproject.toml, run by `make test` as `lint-imports`) cover every module."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("finetune", "data_prep", "eval")


def test_every_module_sits_in_a_layer():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    placed = {name for layer in layers for name in re.split(r"[|:\s]+", layer) if name}
    modules = {f"{package}.{path.stem}" for package in PACKAGES for path in (REPO / package).glob("*.py")
               if path.stem != "__init__"}
    assert config["root_packages"] == list(PACKAGES)
    assert modules - placed == set(), "place new modules in a layer of [tool.importlinter] in pyproject.toml"
    assert placed - modules == set(), "a module named in [tool.importlinter] no longer exists"
