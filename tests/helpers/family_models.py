"""The conformance matrix's tiny models, one per family, and what its checks share (tests/test_families.py,
tests/test_export.py import the fixtures from here)."""

import copy
import os
import re

import peft
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from finetune.config.parsing import parse_recipe
from finetune.config.recipe import ModelInit
from finetune.core import families, synthetic_task
from finetune.modeling import moe
from finetune.modeling.loading import load_pretrained
from finetune.modeling.tiny import init_config, train_tokenizer

# The families the checks run on: the registry's hand-written entries in the suite; with MOETUNE_ALL_FAMILIES=1
# (`python -m tests.helpers.conformance_matrix`) every MoE causal-LM type of the installed transformers
# (families.moe_model_types; tests/test_every_family.py runs the fast cell and the CLI chain of each).
REGISTRY = [name for name, entry in families.FAMILIES.items() if entry.router is not None]
FAMILIES = list(families.moe_model_types()) if os.environ.get("MOETUNE_ALL_FAMILIES") == "1" else REGISTRY
ROLES = ["attention", "experts", "shared_experts", "dense_mlp"]

# family -> (cell from which on it fails, a regex of the error it still raises, the reason shown in the matrix)
KNOWN = {
    "doge": ("roles", "no router|has no MoE layers|moetune run .* failed",
             "Doge's experts are embedding rows (one vector per expert, retrieved by product keys), not 3-D expert "
             "weights: no router or routed experts to find; and its router reshapes the whole batch's logits "
             "(`view(2, bsz * seq_len, -1)`), so a token's experts depend on the other rows of its batch, which "
             "no padding-free or per-sequence check can reproduce"),
}


def known_failure(family: str, cell: str, action):
    """Run a cell KNOWN to fail: assert it still fails with its error, then report it skipped with its reason."""
    entry = KNOWN.get(family)
    if entry is None or entry[0] not in (cell, "roles"):
        return action()
    with pytest.raises(Exception, match=entry[1]):
        action()
    pytest.skip(f"fails: {entry[2]}")


@pytest.fixture(scope="session")
def data():
    """A tokenizer trained on synthetic conversations and pairs, with 8 of each."""
    pairs = list(synthetic_task.preference_pairs(8, 3))
    conversations = list(synthetic_task.sft_conversations(8, 4))
    texts = [m["content"] for row in pairs for key in ("prompt", "chosen", "rejected") for m in row[key]]
    texts += [m["content"] for row in conversations for m in row["messages"]]
    return train_tokenizer(texts, vocab_size=200), Dataset.from_list(pairs), Dataset.from_list(conversations)


@pytest.fixture(scope="session")
def models(data, tmp_path_factory):
    """A cache of one tiny model per family (3 layers: dense-then-MoE layouts appear), built on first use, saved
    and loaded back the way the CLI loads a checkpoint."""
    tokenizer = data[0]
    built = {}

    def model_of(architecture):
        if architecture in KNOWN:  # every check of a family that cannot be built or has no router says why
            known_failure(architecture, "roles", lambda: routed(build(architecture)))
        if architecture not in built:
            built[architecture] = build(architecture)
        return copy.deepcopy(built[architecture])

    def build(architecture):
        init = ModelInit(architecture=architecture, hidden_size=64, intermediate_size=128, num_layers=3,
                         num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05)
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(architecture)
        AutoModelForCausalLM.from_config(init_config(init, tokenizer)).save_pretrained(folder)
        model = load_as_cli(folder)
        families.prepare_for_training(model)
        return model

    return model_of


def load_as_cli(folder):
    """A saved model loaded as the CLI loads a checkpoint (model.name_or_path): dtype, experts kernel, and what
    moetune's loaders set up (a router that reads its weight itself reads it through its LoRA)."""
    recipe = parse_recipe({"run_dir": str(folder / "run"), "model": {"name_or_path": str(folder)}}, "r.yaml")
    return load_pretrained(recipe.model_source, str(folder))


def base_under_adapter(folder, adapter):
    """The base at `folder` as PEFT users load it (plain from_pretrained) to put `adapter` on. A family with flat
    expert matrices (DBRX) is the exception: transformers' class slices its experts' weights outside the module PEFT
    wraps, so plain PEFT refuses the expert adapter (loud, not silently wrong), and it applies through moetune's
    loader, which `moetune merge` and eval use."""
    base = AutoModelForCausalLM.from_pretrained(folder)
    if not families.family_of(base).flat_experts:
        return base
    with pytest.raises(RuntimeError, match="size mismatch for .*experts"):
        peft.PeftModel.from_pretrained(base, adapter)
    return load_as_cli(folder)


def routed(model):
    if not moe.routers(model):
        raise AssertionError(f"{model.config.model_type}: no router found")
    return model


def padded_batch(tokenizer, rows=3):
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False)
             for row in synthetic_task.sft_conversations(rows, 1)]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True)


def refused(action, reason: str):
    """Assert the code refuses `action` with the registry's reason, then report the check as refused."""
    with pytest.raises(ValueError, match=re.escape(reason)):
        action()
    pytest.skip(f"refused: {reason}")
