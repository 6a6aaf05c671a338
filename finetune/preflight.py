"""Checks, before any stage runs, of what a recipe names outside itself: the run dir, the models, eval's files.

Recipe parsing checks values; these check the machine: that run_dir can be a folder, that model.name_or_path and
the models eval.models names are model folders (without code of their own unless model.trust_remote_code) or Hub
models this machine can get (asked once with a short timeout, so that a typo or a missing network fails in
seconds, not after minutes of retries inside from_pretrained), that the files eval reads parse, and, once the
prep stage's output exists, that it holds what the later stages need (preference pairs for dpo, questions for
eval). A stage that would fail on these later fails here instead, before anything is trained. An API judge that
cannot be reached is only a warning.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

from eval.jsonl import file_safe
from eval.judge_prompts import load_judge_prompts
from eval.questions import load_reference_answers
from finetune.config.recipe import Recipe, RecipeError
from finetune.core.remote_files import is_url
from finetune.core.rundir import StageError, read_manifest
from finetune.modeling.loading import remote_code_refused
from finetune.registry import BY_NAME
from finetune.stages.evaluate import check_files, question_source, read_questions, recipe_file
from finetune.training import stage_plan

HUB_TIMEOUT_SECONDS = 10.0
JUDGE_TIMEOUT_SECONDS = 3.0


def check_before_running(recipe: Recipe, stages: list[str], target: stage_plan.Target | None = None) -> None:
    """`target`: the machine the training stages run on (default: this one, as launched)."""
    check_run_dir(recipe)
    needs_model = any(BY_NAME[stage].loads_model for stage in stages) or ("prep" in stages and recipe.data.max_length)
    if needs_model and recipe.model.name_or_path is not None:
        check_model(recipe.model.name_or_path, recipe.model.revision, f"{recipe.source}: model.name_or_path",
                    recipe.model.trust_remote_code)
    # The memory plan, from the model's config on the meta device: a run that cannot fit stops before loading.
    if stage_plan.planned_stages(recipe, stages) and recipe.plan.refuse:
        stage_plan.refuse_if_too_big(recipe, stages, target or stage_plan.make_target(recipe))
    if "eval" in stages:
        check_eval_inputs(recipe, stages)
        warn_if_judge_unreachable(recipe)
    if "prep" not in stages:
        check_prepared(recipe, stages)


def check_eval_inputs(recipe: Recipe, stages: list[str]) -> None:
    """What eval reads, read now (it runs last, after hours of training): its files parsed, the models it names
    found. A Hub id whose answers an earlier run saved is not asked for: that model is never loaded again."""
    check_files(recipe)
    config, judge = recipe.eval, recipe.eval.judge
    local_file = config.question_file is not None and not is_url(config.question_file) \
        and Path(question_source(recipe)).is_file()
    if local_file or (config.question_file is None and "prep" not in stages):  # else: after prep, or a Hub dataset
        read_questions(recipe)
    if judge.reference_answer_file is not None and not is_url(judge.reference_answer_file):
        load_reference_answers(recipe_file(recipe, judge.reference_answer_file))
    if judge.prompt_file is not None and not is_url(judge.prompt_file):
        load_judge_prompts(recipe_file(recipe, judge.prompt_file))
    named = {f"eval.models[{index}]": name for index, name in enumerate(config.models)}
    if judge.type == "local":
        named["eval.judge.model"] = judge.model
    this_run = BY_NAME["eval"].needs_for(recipe)  # the names that are this run's stages: the registry checks them
    for key, name in named.items():
        if name in this_run or (key != "eval.judge.model" and answers_saved(recipe, name)):
            continue
        check_model(name, None, f"{recipe.source}: {key}", recipe.model.trust_remote_code)


def answers_saved(recipe: Recipe, model: str) -> bool:
    return any((recipe.run_path / folder / "model_answer" / f"{file_safe(model)}.jsonl").is_file()
               for folder in ("eval", ".eval.partial"))


def check_prepared(recipe: Recipe, stages: list[str]) -> None:
    """Once the prep stage's output exists (before the first training stage): what the later stages need of it."""
    manifest = read_manifest(recipe.run_path / "data")
    if manifest is None:
        return  # each stage that needs it says to run prep
    splits, data = manifest["outputs"]["splits"], recipe.run_path / "data"
    if "dpo" in stages and not splits["preference"]["train"]:
        raise StageError(f"[dpo] {data} holds no preference pairs for training ({splits['sft']['train']} SFT "
                         f"conversations; see {data / 'report.json'}), so DPO would have nothing to learn from. Add "
                         f"a source of pairs to data.sources (formats preference, hh_rlhf, scored, oasst, onpolicy), "
                         f"or leave dpo out (--stages prep,sft,eval).")
    if "eval" in stages and recipe.eval.question_file is None:
        read_questions(recipe)


def warn_if_judge_unreachable(recipe: Recipe) -> None:
    """An API judge that cannot be reached now is only a warning: it may be up by the time eval runs, and the
    answers are saved either way."""
    judge = recipe.eval.judge
    if judge.type != "openai":
        return
    url = urlparse(judge.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=JUDGE_TIMEOUT_SECONDS).close()
    except (OSError, UnicodeError) as error:
        print(f"[preflight] warning: the judge at {judge.base_url} (eval.judge.base_url) cannot be reached now "
              f"({error}). eval needs it at the end; its answers are saved either way, and once the judge is up the "
              f"same command goes on from them.", file=sys.stderr, flush=True)


def check_run_dir(recipe: Recipe) -> None:
    """run_dir is a folder or can become one: neither it nor a folder above it is a regular file."""
    run_dir = recipe.run_path.absolute()
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RecipeError(f"{recipe.source}: run_dir {run_dir} cannot be a folder: {folder} is a file. "
                                  f"Choose another run_dir (e.g. runs/my-run), or move the file away.")
            return


def ships_code(folder: Path) -> bool:
    """The folder's config names Python classes of its own (auto_map), which loading it would run."""
    config = folder / "config.json"
    try:
        return config.is_file() and "auto_map" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # from_pretrained says what is wrong with it


def looks_local(location: str) -> bool:
    """A path rather than a Hub id ('name' or 'org/name'): absolute, ./ ../ ~, or more than one slash."""
    return (Path(location).expanduser().is_absolute() or location.startswith((".", "~")) or "\\" in location
            or location.count("/") > 1)


def check_model(location: str, revision: str | None, key: str, trust_remote_code: bool = False) -> None:
    """A model folder (config.json, or an adapter's adapter_config.json), else a Hub model this machine can get."""
    path = Path(location).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise RecipeError(f"{key}: {path.resolve()} has no config.json, so it is not a transformers model folder. "
                              f"Point it at the folder save_pretrained wrote.")
        if not trust_remote_code and ships_code(path):
            raise RecipeError(f"{key}: {remote_code_refused(str(path.resolve()))}")
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
