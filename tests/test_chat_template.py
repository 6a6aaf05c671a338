"""`model.chat_template` in the recipe, and what SFT's assistant-only loss asks of a template."""

import pytest
from trl.chat_template_utils import has_generation_markers

from finetune.config.chat_template import MARKERS, TRL_TRAINING_TEMPLATE, assistant_token_source
from finetune.config.recipe import RecipeError
from finetune.config.parsing import load_recipe
from helpers.lookalike import FAMILIES, TRL_TEMPLATES, train_family_tokenizer

CONVERSATION = [{"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3"},
                {"role": "user", "content": "And 9 8?"}, {"role": "assistant", "content": "8 9"}]


def write(folder, model_lines: str):
    path = folder / "recipe.yaml"
    path.write_text(f"run_dir: {folder / 'run'}\nmodel:\n  name_or_path: some/model\n{model_lines}")
    return path


@pytest.fixture(scope="module")
def mixtral_tokenizer():
    return train_family_tokenizer(FAMILIES["mixtral"])


def test_flagship_recipe_gives_the_base_model_mistrals_template_with_markers(mixtral_tokenizer):
    recipe = load_recipe("recipes/hh-rlhf-mixtral.yaml")
    assert recipe.model.name_or_path == "mistralai/Mixtral-8x7B-v0.1" and mixtral_tokenizer.chat_template is None
    mixtral_tokenizer.chat_template = recipe.model.chat_template
    assert assistant_token_source(mixtral_tokenizer) == MARKERS
    encoded = mixtral_tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    text = mixtral_tokenizer.decode(encoded["input_ids"])
    assert text == "<s>[INST] Sort 3 1 2. [/INST]1 2 3</s>[INST] And 9 8? [/INST]8 9</s>"
    trained = [token for token, keep in zip(encoded["input_ids"], encoded["assistant_masks"]) if keep]
    assert mixtral_tokenizer.decode(trained) == "1 2 3</s>8 9</s>"  # the replies and their end token, nothing else


def test_template_is_a_string_or_a_file_relative_to_the_recipe(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    from_file = load_recipe(write(tmp_path, "  chat_template: templates/chat.jinja\n"))
    assert from_file.model.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    inline = load_recipe(write(tmp_path, "  chat_template: \"{{ messages[0]['content'] }}\"\n"))
    assert inline.model.chat_template == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("value, message", [
    ("templates/missing.jinja", "model.chat_template names {folder}/templates/missing.jinja, which is not a file"),
    ("\"{% for m in messages %}\"", "model.chat_template is not a valid Jinja template (line 1"),
])
def test_bad_templates_are_refused_naming_the_key(tmp_path, value, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, f"  chat_template: {value}\n"))
    assert message.format(folder=tmp_path) in str(error.value)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_family_templates_without_markers_get_trls_training_copy(family):
    tokenizer = train_family_tokenizer(FAMILIES[family])
    assert not has_generation_markers(tokenizer.chat_template)
    assert assistant_token_source(tokenizer) == TRL_TRAINING_TEMPLATE  # TRL swaps in trl/chat_templates/*_training.jinja
    assert (TRL_TEMPLATES / FAMILIES[family].template.replace(".jinja", "_training.jinja")).is_file()
