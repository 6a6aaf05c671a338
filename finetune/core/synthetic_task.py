"""A deterministic synthetic instruction task whose answers can be checked: the built-in CPU demo's data.

Three skills a tiny model can learn (sorting digits, reversing a digit sequence, writing a word in capitals),
asked in one or two turns ("Now do the same for: ..."). As in real alignment, the preference data carries something
the SFT data does not: SFT answers come in three styles (mostly terse, sometimes "Answer: ...", rarely a full
sentence), and the preference pairs prefer the full sentence with a correct answer. The programmatic judge rewards
exactly that on the MT-Bench 1-10 scale, so DPO can only gain by shifting probability toward a style the SFT
model already produces, which is what DPO does well.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Skill:
    category: str
    phrasings: tuple[str, ...]
    sentence: str  # the preferred answer style; {answer} is the checked part
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]


def digit_list(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


SKILLS = (
    Skill(
        "sorting",
        ("Sort these digits: {x}", "Put these digits in ascending order: {x}", "Sort: {x}"),
        "The sorted digits are {answer}.",
        digit_list,
        lambda x: " ".join(sorted(x.split())),
    ),
    Skill(
        "reversal",
        ("Reverse this sequence: {x}", "Write these digits backwards: {x}", "Reverse: {x}"),
        "The reversed sequence is {answer}.",
        digit_list,
        lambda x: " ".join(reversed(x.split())),
    ),
    Skill(
        "capitals",
        ("Write this word in capital letters: {x}", "Uppercase: {x}", "Capitalize every letter of {x}"),
        "In capital letters it is {answer}.",
        word,
        str.upper,
    ),
)
SKILL_BY_CATEGORY = {skill.category: skill for skill in SKILLS}
FOLLOW_UP = "Now do the same for: {x}"

# Answer styles in the SFT data and how often each appears. The sentence style is the preferred one.
STYLES = ("terse", "labelled", "sentence")
SFT_STYLE_WEIGHTS = (0.55, 0.30, 0.15)


def styled(skill: Skill, answer: str, style: str) -> str:
    if style == "terse":
        return answer
    if style == "labelled":
        return f"Answer: {answer}"
    return skill.sentence.format(answer=answer)


def near_miss(rng: random.Random, answer: str) -> str:
    """A plausibly wrong answer: two neighbouring items swapped, or one item changed."""
    items = answer.split() if " " in answer else list(answer)
    joiner = " " if " " in answer else ""
    if len(set(items)) > 1 and rng.random() < 0.5:
        while True:
            i = rng.randrange(len(items) - 1)
            if items[i] != items[i + 1]:
                items[i], items[i + 1] = items[i + 1], items[i]
                break
    else:
        i = rng.randrange(len(items))
        pool = DIGITS if items[i].isdigit() else LETTERS.upper()
        items[i] = rng.choice([c for c in pool if c != items[i]])
    return joiner.join(items)


@dataclass
class Exchange:
    """One or two turns of one skill: the user's messages and the correct answers."""

    skill: Skill
    questions: list[str]
    answers: list[str]


def sample_exchange(rng: random.Random, turns: int) -> Exchange:
    skill = rng.choice(SKILLS)
    inputs = [skill.make_input(rng) for _ in range(turns)]
    questions = [rng.choice(skill.phrasings).format(x=inputs[0])] + [FOLLOW_UP.format(x=x) for x in inputs[1:]]
    return Exchange(skill, questions, [skill.solve(x) for x in inputs])


def sft_conversations(n: int, seed: int) -> Iterator[dict]:
    """SFT rows {"messages": [...]}, half single-turn, half two-turn, answers in mixed styles."""
    rng = random.Random(f"sft-{seed}")
    for _ in range(n):
        ex = sample_exchange(rng, turns=rng.choice((1, 2)))
        messages = []
        for question, answer in zip(ex.questions, ex.answers):
            style = rng.choices(STYLES, SFT_STYLE_WEIGHTS)[0]
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": styled(ex.skill, answer, style)}]
        yield {"messages": messages}


def preference_pairs(n: int, seed: int) -> Iterator[dict]:
    """Preference rows: chosen is a correct full sentence; rejected is a correct answer in another style or a near miss."""
    rng = random.Random(f"pref-{seed}")
    for _ in range(n):
        ex = sample_exchange(rng, turns=rng.choice((1, 2)))
        prompt = []
        for question, answer in zip(ex.questions[:-1], ex.answers[:-1]):
            style = rng.choices(STYLES, SFT_STYLE_WEIGHTS)[0]
            prompt += [{"role": "user", "content": question},
                       {"role": "assistant", "content": styled(ex.skill, answer, style)}]
        prompt.append({"role": "user", "content": ex.questions[-1]})
        answer = ex.answers[-1]
        chosen = styled(ex.skill, answer, "sentence")
        if rng.random() < 0.7:
            rejected = styled(ex.skill, answer, rng.choice(("terse", "labelled")))
        else:
            rejected = styled(ex.skill, near_miss(rng, answer), "sentence")
        yield {"prompt": prompt,
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}


def questions(n: int, seed: int) -> Iterator[dict]:
    """Held-out two-turn questions in MT-Bench's question format, with reference answers."""
    rng = random.Random(f"questions-{seed}")
    for index in range(n):
        ex = sample_exchange(rng, turns=2)
        yield {"question_id": index + 1, "category": ex.skill.category,
               "turns": ex.questions, "reference": ex.answers}


def reference_for(questions: list[str]) -> tuple[str, str] | None:
    """(category, reference answer) of the last of a conversation's questions (a first question, then optional
    follow-ups), solved again from their text; None when the first is not a question of this task."""
    asked = parse_question(questions[0]) if questions else None
    if asked is None:
        return None
    skill, task_input = asked
    follow_up = FOLLOW_UP.split("{x}")[0]
    if len(questions) > 1 and questions[-1].startswith(follow_up):
        task_input = questions[-1][len(follow_up):]
    return skill.category, skill.solve(task_input)


def parse_question(text: str) -> tuple[Skill, str] | None:
    """(skill, its input) of a first question of this task, or None."""
    for skill in SKILLS:
        for phrasing in skill.phrasings:
            prefix = phrasing.split("{x}")[0]
            if text.startswith(prefix):
                return skill, text[len(prefix):]
    return None


def score_answer(category: str, answer: str, reference: str) -> int:
    """The programmatic judge, on MT-Bench's scale: 10 for a correct full sentence, 6 correct otherwise, 2 wrong,
    1 unreadable. The eval stage's judge (eval/judge_backends.py) and on-policy pair scoring (data_prep/onpolicy.py)
    both score with it."""
    skill = SKILL_BY_CATEGORY[category]
    text = answer.strip()
    if text == skill.sentence.format(answer=reference):
        return 10
    if text in (reference, f"Answer: {reference}"):
        return 6
    looks_like_answer = re.fullmatch(r"(Answer: )?[0-9A-Za-z ]+\.?", text) or text.startswith(skill.sentence[:12])
    return 2 if looks_like_answer else 1
