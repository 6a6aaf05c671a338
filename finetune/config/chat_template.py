"""Chat templates: the recipe's `model.chat_template` (for base models that ship none), and what SFT's
assistant-only loss needs of a template.

A recipe gives the template as a Jinja string or as the path of a .jinja file relative to the recipe's folder. The
file is read when the recipe is parsed, so the resolved recipe saved beside each stage's output holds the template
itself (that copy moves with the folder) and a changed file changes the stages' fingerprints.

TRL's assistant-only loss finds the assistant's tokens through `{% generation %}` markers. Most families' own
templates have none; TRL 1.16 swaps in a marked-up copy for the templates it knows (trl/chat_templates/
*_training.jinja: DeepSeek-V3, gpt-oss, Qwen3, GLM-4-MoE, ...). For any other template without markers (base models'
plain templates) moetune finds the assistant's tokens itself, turn by turn.
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


MARKERS = "markers"
TRL_TRAINING_TEMPLATE = "trl_training_template"
TURN_BY_TURN = "turn_by_turn"
HOW = {
    MARKERS: "the chat template's {% generation %} markers",
    TRL_TRAINING_TEMPLATE: "the {% generation %} markers of TRL's training version of the chat template",
    TURN_BY_TURN: "the chat template has no {% generation %} markers: assistant tokens found by rendering each "
                  "conversation turn by turn and comparing token prefixes",
}


def assistant_token_source(tokenizer) -> str:
    """How SFT's assistant-only loss finds the assistant's tokens with this tokenizer's template: its markers, the
    markers of TRL's training copy of it, or (a plain template) turn by turn (finetune/training/assistant_masks.py)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return MARKERS
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return TURN_BY_TURN
    return TRL_TRAINING_TEMPLATE
