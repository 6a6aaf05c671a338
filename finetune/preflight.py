"""Checks, before any stage runs, of what a recipe names outside itself: the run dir, the models, eval's files.

Recipe parsing checks values; these check the machine: that run_dir can be a folder, that model.name_or_path is
a model folder or a Hub model this machine can get (asked with a short timeout, so that a typo or a missing
network fails in seconds, not after minutes of retries inside from_pretrained), and that the files eval names
exist. A stage that would fail on these later fails here instead, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

from finetune.stages.evaluate import check_files
from finetune.config.recipe import Recipe, RecipeError
from finetune.registry import BY_NAME, STAGES

HUB_TIMEOUT_SECONDS = 10.0


def check_before_running(recipe: Recipe, stages: list[str]) -> None:
    check_run_dir(recipe)
    needs_model = any(BY_NAME[stage].loads_model for stage in stages) or ("prep" in stages and recipe.data.max_length)
    if needs_model and recipe.model.name_or_path is not None:
        check_model(recipe.model.name_or_path, recipe.model.revision, f"{recipe.source}: model.name_or_path")
    if "eval" in stages:
        check_eval_models(recipe)


def check_eval_models(recipe: Recipe) -> None:
    """The files `eval:` names, and the models it names by path. Hub ids are not asked for here: a model whose
    answers an earlier run saved is never loaded."""
    check_files(recipe)
    named = {f"eval.models[{index}]": name for index, name in enumerate(recipe.eval.models)}
    if recipe.eval.judge.type == "local":
        named["eval.judge.model"] = recipe.eval.judge.model
    model_stages = {spec.name for spec in STAGES if spec.holds_model}  # a name of these is this run's folder
    for key, name in named.items():
        if name not in model_stages and (Path(name).expanduser().exists() or looks_local(name)):
            check_model(name, None, f"{recipe.source}: {key}")


def check_run_dir(recipe: Recipe) -> None:
    """run_dir is a folder or can become one: neither it nor a folder above it is a regular file."""
    run_dir = recipe.run_path.absolute()
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RecipeError(f"{recipe.source}: run_dir {run_dir} cannot be a folder: {folder} is a file. "
                                  f"Choose another run_dir (e.g. runs/my-run), or move the file away.")
            return


def looks_local(location: str) -> bool:
    """A path rather than a Hub id ('name' or 'org/name'): absolute, ./ ../ ~, or more than one slash."""
    return (Path(location).expanduser().is_absolute() or location.startswith((".", "~")) or "\\" in location
            or location.count("/") > 1)


def check_model(location: str, revision: str | None, key: str) -> None:
    """A model folder (config.json, or an adapter's adapter_config.json), else a Hub model this machine can get."""
    path = Path(location).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise RecipeError(f"{key}: {path.resolve()} has no config.json, so it is not a transformers model folder. "
                              f"Point it at the folder save_pretrained wrote.")
        return
    if path.exists():
        raise RecipeError(f"{key}: {path.resolve()} is a file; it must be a model folder or a Hub id.")
    if looks_local(location):
        raise RecipeError(f"{key}: {path.absolute()} does not exist (relative paths start at the folder moetune runs "
                          f"in, {Path.cwd()}). Fix the path, or give a Hub id such as mistralai/Mixtral-8x7B-v0.1.")
    check_hub_model(location, revision, key)


def check_hub_model(repo_id: str, revision: str | None, key: str) -> None:
    """The Hub knows `repo_id` (or it is cached here while the Hub is unreachable: then loading goes offline)."""
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return
        raise RecipeError(f"{key}: {repo_id} is neither a local folder nor in the Hub cache ({constants.HF_HUB_CACHE}), "
                          f"and HF_HUB_OFFLINE is set. Download it first, or point model.name_or_path at its folder.")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_SECONDS)
    except HFValidationError:
        raise RecipeError(f"{key}: {repo_id!r} is neither an existing folder nor a valid Hub id (org/name).") from None
    except GatedRepoError:
        raise RecipeError(f"{key}: {repo_id} is gated on the Hub: accept its terms on huggingface.co, then log in "
                          f"(`hf auth login`) or set HF_TOKEN.") from None
    except RevisionNotFoundError:
        raise RecipeError(f"{key}: the Hub model {repo_id} has no revision {revision!r} (model.revision).") from None
    except RepositoryNotFoundError:
        raise RecipeError(f"{key}: {repo_id} is neither a local folder ({Path(repo_id).absolute()} does not exist) "
                          f"nor a model on the Hub (or it is private: log in with `hf auth login` or set HF_TOKEN). "
                          f"Fix the path or the id.") from None
    except Exception as error:  # noqa: BLE001 - the HTTP client's errors (its module changes between releases)
        if cached:
            go_offline(repo_id)
            return
        raise RecipeError(f"{key}: {repo_id} is not a local folder, and the Hub at {constants.ENDPOINT} cannot be "
                          f"reached ({type(error).__name__}: {error}). Connect to the network, set HF_ENDPOINT to "
                          f"a reachable mirror, or download the model and point model.name_or_path at its folder."
                          ) from None


def go_offline(repo_id: str) -> None:
    """Load from the cache without asking the Hub, which would retry for about a minute before using the cache."""
    print(f"[preflight] the Hub is unreachable; loading {repo_id} from the local cache (HF_HUB_OFFLINE=1).")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
