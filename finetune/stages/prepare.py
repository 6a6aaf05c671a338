"""The prep stage: read every source of the recipe, convert, validate, filter, and write the training files.

run_dir/data/ gets sft/{train,test}.jsonl, preference/{train,test}.jsonl, questions.jsonl (when a source yields eval
questions) and report.json. Same recipe and seed give byte-identical files; unchanged inputs skip the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from finetune.config.data import GENERATED_FORMATS, DataConfig
from data_prep.formats import CONVERTERS, sft_from_chosen
from data_prep.quality import QualityFilter, normalized_text, prompt_of
from data_prep.records import DataError, Example, Problem, Row, RowError
from data_prep.source_stats import SourceStats, summary
from data_prep.sources import read_rows, resolve_path, sampled, source_name
from data_prep.validate import normalized
from data_prep.writer import SplitWriter
from finetune.modeling.loading import load_tokenizer
from finetune.config.recipe import Recipe
from finetune.core.remote_files import recipe_file
from finetune.training.reply_truncation import PREP_SAMPLE, prep_warning
from finetune.core.rundir import Stage, file_digest, write_json_atomic

KINDS = ("sft", "preference")


def run(recipe: Recipe, needed: dict[str, dict] | None = None, force: bool | str = False, tokenizer: Any = None) -> Path:
    """Run the prep stage; returns run_dir/data. It needs no earlier stage (`needed` is empty); `tokenizer`
    overrides the model's (tests)."""
    base_dir = recipe.base_dir
    stage = Stage(recipe.run_path, "data", inputs=stage_inputs(recipe))
    if not stage.begin(force):
        return stage.final
    if tokenizer is None and recipe.data.max_length is not None:
        tokenizer = load_tokenizer(recipe.model_source)
    report = prepare(stage.work, recipe.data, recipe.seed, base_dir, tokenizer)
    write_json_atomic(stage.work / "report.json", report)
    print(summary(report))
    warn_if_replies_cut(recipe, tokenizer, stage.work / "sft" / "train.jsonl")
    if not any(report["splits"][kind]["train"] + report["splits"][kind]["test"] for kind in KINDS):
        raise DataError(f"{recipe.source}: data.sources gave no training examples (see the counts above and "
                        f"{stage.work / 'report.json'}). Add rows or sources that make SFT conversations or "
                        f"preference pairs.")
    return stage.commit(outputs={"splits": report["splits"], "questions": report["questions"]})


def warn_if_replies_cut(recipe: Recipe, tokenizer: Any, conversations_file: Path) -> None:
    """One line when sft.max_length would leave most conversations without an assistant token (SFT drops them).

    Needs the model's tokenizer and template: a model.init model has none before its base stage (its template is
    short), and a model that cannot load its tokenizer here is left to the SFT stage's own check."""
    if tokenizer is None and recipe.model.init is None:
        try:
            tokenizer = load_tokenizer(recipe.model_source)
        except (OSError, ValueError):
            return
    if tokenizer is None or not conversations_file.is_file():
        return
    with conversations_file.open(encoding="utf-8") as rows:
        conversations = [json.loads(line)["messages"] for line, _ in zip(rows, range(PREP_SAMPLE))]
    warning = prep_warning(recipe.sft, tokenizer, conversations)
    if warning:
        print(warning)


def prepare(work: Path, data: DataConfig, seed: int, base_dir: Path, tokenizer: Any) -> dict[str, Any]:
    writers = {kind: SplitWriter(work / kind, seed, data.test_size) for kind in KINDS}
    quality = QualityFilter(data, base_dir, tokenizer)
    questions = []  # eval questions are few (hundreds); they are written unsplit, in order
    sources = []
    for index, source in enumerate(data.sources):
        stats = SourceStats(f"#{index} {source_name(source)}")
        rows = counted(read_rows(source, base_dir), stats)
        items = sampled(validated(CONVERTERS[source.format](rows, source, seed)), source, seed, index)
        for item in items:
            if isinstance(item, Problem):
                stats.problem(item)
            elif not (stats.malformed and data.on_error == "fail"):  # failing anyway: only count the rest
                for example in with_sft_from_chosen(item, source.sft_from_chosen):
                    keep(example, quality, writers, questions, stats)
        if data.on_error == "fail":
            stats.fail_if_malformed()
        if stats.read == 0 and source.format not in GENERATED_FORMATS:
            raise DataError(f"{source_name(source)}: no rows (an empty file or split?). Fill it, or remove "
                            f"data.sources[{index}] from the recipe.")
        sources.append(stats.as_dict())
    write_questions(work / "questions.jsonl", questions)
    lengths = quality.lengths.percentiles() if quality.lengths is not None else None
    return {"sources": sources, "splits": {kind: writer.finish() for kind, writer in writers.items()},
            "questions": len(questions), "token_lengths": lengths, "seed": seed}


def keep(example: Example, quality: QualityFilter, writers: dict, questions: list, stats: SourceStats) -> None:
    if example.kind == "question":
        questions.append(example.row)
    else:
        prompt_key = normalized_text(prompt_of(example))  # used by prompt dedup and by the split
        reason = quality.drop_reason(example, prompt_key)
        if reason is not None:
            stats.dropped[reason] += 1
            return
        writers[example.kind].add(example.row, split_key=prompt_key)
    stats.kept[example.kind] += 1


def counted(rows: Iterator[Row], stats: SourceStats) -> Iterator[Row]:
    for row in rows:
        stats.read += 1
        yield row


def validated(items: Iterator[Example | Problem]) -> Iterator[Example | Problem]:
    """Examples in the normalized schema; one that breaks it becomes a Problem naming its row."""
    for item in items:
        if isinstance(item, Example):
            try:
                item = Example(item.kind, normalized(item.kind, item.row), item.location)
            except RowError as error:
                item = Problem(item.location, str(error))
        yield item


def with_sft_from_chosen(example: Example, enabled: bool) -> list[Example]:
    if enabled and example.kind == "preference":
        return [example, sft_from_chosen(example)]
    return [example]


def write_questions(path: Path, questions: list[dict]) -> None:
    if questions:
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(question, ensure_ascii=False) + "\n" for question in questions)


def stage_inputs(recipe: Recipe, needed: dict[str, dict] | None = None) -> dict[str, Any]:
    """What the output depends on: the data section, the seed, the content of every local file, the tokenizer."""
    base_dir = recipe.base_dir
    data = recipe.data
    files = [resolve_path(source, base_dir) for source in data.sources]
    if data.decontamination is not None:
        files += [recipe_file(name, base_dir) for name in data.decontamination.question_files]
    inputs = {"data": recipe.section_dict("data"), "seed": recipe.seed,
              "files": {str(path): file_digest(path) for path in files if path is not None}}
    if data.max_length is not None:
        inputs["tokenizer"] = recipe.section_dict("model")
    return inputs
