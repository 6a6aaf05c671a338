"""Chat templates: the recipe's `model.chat_template` (for base models that ship none), and what SFT's
assistant-only loss needs of a template.

A recipe gives the template as a Jinja string or as the path of a .jinja file relative to the recipe's folder. The
file is read when the recipe is parsed, so the resolved recipe saved beside each stage's output holds the template
itself (that copy moves with the folder) and a changed file changes the stages' fingerprints.

TRL's assistant-only loss finds the assistant's tokens through `{% generation %}` markers. Most families' own
templates have none; TRL 1.16 swaps in a marked-up copy for the templates it knows (trl/chat_templates/
*_training.jinja: DeepSeek-V3, gpt-oss, Qwen3, GLM-4-MoE, ...). Any other template without markers is refused here,
before training, with the two ways out.
"""

from __future__ import annotations

from pathlib import Path

JINJA_SYNTAX = ("{{", "{%")


def resolve_chat_template(value: str, base_dir: Path, source: str) -> str:
    """The template text of a recipe's `model.chat_template`: the string itself, or the file it names."""
    if any(mark in value for mark in JINJA_SYNTAX):
        template = value
    else:
        path = base_dir / value
        if not path.is_file():
            raise ValueError(f"{source}: model.chat_template names {path}, which is not a file. Give a Jinja "
                             f"template string, or the path of a .jinja file relative to the recipe's folder.")
        template = path.read_text(encoding="utf-8")
    check_syntax(template, source)
    return template


def check_syntax(template: str, source: str) -> None:
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as error:
        raise ValueError(f"{source}: model.chat_template is not a valid Jinja template (line {error.lineno}: "
                         f"{error.message}).") from None


def training_template_problem(tokenizer, where: str) -> str | None:
    """Why SFT with assistant-only loss cannot use this tokenizer's template, or None when it can.

    It can when the template has `{% generation %}` markers, or when TRL ships a training version of it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return (f"the chat template of {where} has no {{% generation %}} markers, which sft.assistant_only_loss "
                f"needs to find the assistant's tokens, and TRL ships no training version of it. Wrap each assistant "
                f"reply (and its end-of-turn token) in {{% generation %}}...{{% endgeneration %}} in "
                f"model.chat_template, or set sft.assistant_only_loss: false to train on whole conversations.")
    return None
