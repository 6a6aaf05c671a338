"""Assistant-only loss with a plain chat template (no `{% generation %}` markers): the assistant's tokens found turn
by turn (finetune/training/assistant_masks.py), compared with the marker-based mask on every TRL training template,
and a base-model look-alike trained through the CLI (issue #24)."""

import copy

import pytest
from datasets import Dataset
from trl.data_utils import common_prefix_length

from finetune.core import synthetic_task
from finetune.training.assistant_masks import NotPrefixStable, assistant_mask, token_ids, tokenized_with_masks
from helpers.lookalike import FAMILIES, TRL_TEMPLATES, build_lookalike, train_family_tokenizer
from helpers.recipes import logged, run_cli, write_lookalike_recipe

TWO_TURNS = [{"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": "And 9 8?"}, {"role": "assistant", "content": "8 9"}]
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['role'] }}: {{ m['content'] }}"
          "{{ eos_token }}{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endif %}"
          "{% endfor %}")
# Templates for images and text: their messages hold lists of parts, not the plain strings of moetune's data.
MULTIMODAL = {"idefics3_training.jinja", "llava_next_training.jinja", "smolvlm_training.jinja"}
TRAINING_TEMPLATES = sorted(path.name for path in TRL_TEMPLATES.glob("*_training.jinja"))
# Where the markers and the generation prompt disagree, beyond the prompt cue (see the test).
END_OF_TURN_RENAMED = {"gptoss_training.jinja"}  # a non-final turn ends <|end|>, the final one <|return|>


@pytest.fixture(scope="module")
def tokenizers():
    """gpt-oss's look-alike tokenizer (its <|end|>/<|return|> are single tokens) for its template, Qwen3's for the rest."""
    return {family: train_family_tokenizer(FAMILIES[family]) for family in ("qwen3_moe", "gpt_oss")}


def conversations():
    rows = [row["messages"] for row in synthetic_task.sft_conversations(6, 3)]
    return rows + [[{"role": "system", "content": "Answer briefly."}] + rows[0]]


def cue_tokens(tokenizer, messages, whole) -> set[int]:
    """Positions of the tokens the generation prompt adds before each assistant turn (the prompt's cue)."""
    cue = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            history = common_prefix_length(token_ids(tokenizer, messages[:i]), whole)
            cue |= set(range(history, common_prefix_length(token_ids(tokenizer, messages[:i], True), whole)))
    return cue


def runs(positions: set[int]) -> list[list[int]]:
    """Consecutive positions grouped: [[3, 4], [9]] for {3, 4, 9}."""
    grouped = []
    for k in sorted(positions):
        if grouped and grouped[-1][-1] == k - 1:
            grouped[-1].append(k)
        else:
            grouped.append([k])
    return grouped


@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_turn_by_turn_mask_is_the_marker_mask_up_to_the_generation_prompt(tokenizers, name):
    """Equal to the `{% generation %}` mask, token for token, except where a template's markers also cover tokens its
    own generation prompt writes (`<|im_start|>assistant` + newline, an empty think block): the prompt, not the
    model, writes those at inference, so the turn-by-turn mask leaves them out. Nothing else may differ."""
    if name in MULTIMODAL:
        pytest.skip("multimodal template: its messages hold lists of parts")
    template = copy.copy(tokenizers["gpt_oss" if name.startswith("gptoss") else "qwen3_moe"])
    template.chat_template = (TRL_TEMPLATES / name).read_text(encoding="utf-8")
    compared = 0
    for messages in conversations():
        if name.startswith("gemma_") and messages[0]["role"] == "system":
            continue  # Gemma's template refuses system messages
        marked = template.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        input_ids, mask = assistant_mask(template, messages)
        assert input_ids == list(marked["input_ids"])
        markers = list(marked["assistant_masks"])
        assert all(markers[k] for k, bit in enumerate(mask) if bit), "a token outside the markers is masked in"
        left_out = {k for k, bit in enumerate(mask) if markers[k] and not bit}
        beyond_cue = [template.decode([input_ids[k] for k in run]) for run in runs(left_out - cue_tokens(
            template, messages, input_ids))]
        assert beyond_cue == (["<|end|>"] * len(beyond_cue) if name in END_OF_TURN_RENAMED else []), beyond_cue
        compared += 1
    assert compared >= 6


def test_the_flagship_mistral_template_gives_the_marker_mask_exactly():
    from finetune.config.parsing import load_recipe

    tokenizer = train_family_tokenizer(FAMILIES["mixtral"])
    tokenizer.chat_template = load_recipe("recipes/hh-rlhf-mixtral.yaml").model.chat_template
    for messages in conversations()[:6]:
        marked = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert assistant_mask(tokenizer, messages) == (list(marked["input_ids"]), list(marked["assistant_masks"]))


def test_plain_template_masks_each_reply_and_its_end_of_turn():
    tokenizer = train_family_tokenizer(FAMILIES["mixtral"])
    tokenizer.chat_template = PLAIN
    row = tokenized_with_masks(tokenizer, Dataset.from_list([{"messages": TWO_TURNS}]))[0]
    kept = [token if bit else None for token, bit in zip(row["input_ids"], row["assistant_masks"])]
    spans = tokenizer.decode([t for t in kept if t is not None])
    assert spans == "assistant: 1 2 3</s>assistant: 8 9</s>"  # no generation prompt: the model writes its role too


def test_a_template_that_rewrites_earlier_turns_is_refused_not_guessed():
    tokenizer = train_family_tokenizer(FAMILIES["mixtral"])
    # Earlier assistant turns disappear once a later turn follows (as templates that drop past reasoning do).
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    with pytest.raises(NotPrefixStable, match="renders assistant turn 1 differently"):
        assistant_mask(tokenizer, TWO_TURNS)


@pytest.mark.slow  # a look-alike, then prep and two SFT steps twice: ~40 s on a shared 2-core machine
def test_base_model_with_a_plain_template_trains_sft_on_assistant_tokens_through_the_cli(tmp_path):
    folder = build_lookalike("mixtral", tmp_path / "checkpoint")  # a base model: no chat template of its own
    template = tmp_path / "plain.jinja"
    template.write_text(PLAIN)
    recipe = write_lookalike_recipe(tmp_path, folder, template=template)
    printed = run_cli(["run", str(recipe), "--stages", "prep,sft"])
    lines = [line for line in printed.splitlines() if line.startswith("[sft] assistant-only loss:")]
    assert lines == ["[sft] assistant-only loss: the chat template has no {% generation %} markers: assistant "
                     "tokens found by rendering each conversation turn by turn and comparing token prefixes"]
    # The same run with the replies wrapped in {% generation %} markers (TRL's own mask) trains on the same tokens:
    # the same losses, step for step.
    marked_folder = tmp_path / "marked"
    marked_folder.mkdir()
    marked_template = marked_folder / "marked.jinja"
    marked_template.write_text(MARKED)
    marked_recipe = write_lookalike_recipe(marked_folder, folder, template=marked_template)
    printed = run_cli(["run", str(marked_recipe), "--stages", "prep,sft"])
    assert "[sft] assistant-only loss: the chat template's {% generation %} markers" in printed
    losses = [logged(run / "sft") for run in (tmp_path / "run", marked_folder / "run")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
