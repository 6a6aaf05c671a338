"""The import-linter contracts (pyproject.toml, run by `make test` as `lint-imports`) cover every module, and the
layers are folders: a module's place in the contract is the folder it lies in."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("finetune", "data_prep", "eval")


def modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def layers() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_packages"] == list(PACKAGES)
    contract = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    return [name for layer in contract for name in re.split(r"[|:\s]+", layer) if name]


def test_every_module_sits_in_a_layer():
    placed = layers()
    unplaced = {m for m in modules() if m not in PACKAGES
                and not any(m == name or m.startswith(name + ".") for name in placed)}
    assert unplaced == set(), "put new modules in a layer's folder, or name them in [tool.importlinter]"
    assert set(placed) - modules() == set(), "a module named in [tool.importlinter] no longer exists"


def test_the_top_of_finetune_holds_at_most_eight_modules():
    top = sorted(path.name for path in (REPO / "finetune").glob("*.py"))
    assert len(top) <= 8, f"finetune/ holds {top}: new code goes into a layer's folder"
