"""The prep stage end to end: outputs, determinism, skipping, broken inputs in fail and skip modes, filters."""

import json
from pathlib import Path

import pytest

from finetune.stages.prepare import run
from data_prep.records import DataError
from finetune.config.recipe import RecipeError
from finetune.config.parsing import load_recipe
from helpers.recipes import make_recipe
from helpers.shared_data import require_shared_data

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SYNTHETIC = {"format": "synthetic", "options": {"sft": 300, "pairs": 200, "questions": 20}}


def test_synthetic_source_writes_the_contract_files(tmp_path, capsys):
    out = run(make_recipe(tmp_path, [SYNTHETIC], test_size=0.1))
    assert out == tmp_path / "run" / "data"
    sft = read_jsonl(out / "sft/train.jsonl") + read_jsonl(out / "sft/test.jsonl")
    pairs = read_jsonl(out / "preference/train.jsonl") + read_jsonl(out / "preference/test.jsonl")
    report = json.loads((out / "report.json").read_text())
    source = report["sources"][0]
    assert len(sft) == source["kept"]["sft"] and len(pairs) == source["kept"]["preference"]
    assert len(sft) + source["dropped"].get("duplicate", 0) + source["dropped"].get("duplicate_prompt", 0) >= 300
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"} and set(sft[0]) == {"messages"}
    assert 0 < report["splits"]["preference"]["test"] < 0.25 * len(pairs)
    assert len(read_jsonl(out / "questions.jsonl")) == 20
    assert "[data] prepared" in capsys.readouterr().out


def test_same_recipe_gives_identical_files_and_reruns_skip(tmp_path, capsys):
    first = run(make_recipe(tmp_path / "a", [SYNTHETIC]))
    second = run(make_recipe(tmp_path / "b", [SYNTHETIC]))
    for name in ("sft/train.jsonl", "sft/test.jsonl", "preference/train.jsonl", "questions.jsonl", "report.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    capsys.readouterr()
    run(make_recipe(tmp_path / "a", [SYNTHETIC]))
    assert "skipping" in capsys.readouterr().out


def test_a_prompt_never_lands_in_both_splits(tmp_path):
    oasst = {"format": "oasst", "path": str(require_shared_data("oasst1/oasst1_en_validation_messages.jsonl"))}
    out = run(make_recipe(tmp_path, [oasst], dedup="exact", test_size=0.3))
    train = {json.dumps(r["prompt"]) for r in read_jsonl(out / "preference/train.jsonl")}
    test = {json.dumps(r["prompt"]) for r in read_jsonl(out / "preference/test.jsonl")}
    assert train and test and not train & test


BROKEN_ROWS = [
    b'{"prompt": "Q1?", "chosen": "good", "rejected": "bad"}',
    b'{"prompt": "Q2?", "chosen": "good", "rej',  # truncated
    b'{"prompt": "Q3?", "chosen": "good"}',  # missing field
    b'{"prompt": "Q4?", "chosen": "", "rejected": "bad"}',  # empty chosen
    b'{"prompt": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "Q5?"}], "chosen": "a", "rejected": "b"}',
    b'\xff\xfe\x00garbage\x81',  # binary
    b'{"prompt": "Q7?", "chosen": "good", "rejected": "bad"}',
]
EXPECTED_PROBLEMS = [
    (2, "not valid JSON"),
    (3, "missing field 'rejected'"),
    (4, "'chosen' message 1 (assistant) has empty text"),
    (5, "'prompt' message 1 is assistant where user was expected"),
    (6, "not UTF-8 text"),
]


def broken_file(tmp_path) -> Path:
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n".join(BROKEN_ROWS) + b"\n")
    return path


def test_fail_mode_names_the_first_bad_line_and_counts_the_rest(tmp_path):
    path = broken_file(tmp_path)
    with pytest.raises(DataError) as error:
        run(make_recipe(tmp_path, [{"format": "preference", "path": str(path)}]))
    message = str(error.value)
    assert message.startswith(f"{path}:2: not valid JSON")
    assert "4 more malformed rows" in message and "on_error: skip" in message
    assert not (tmp_path / "run" / "data").exists()


def test_skip_mode_drops_and_reports_every_bad_line(tmp_path):
    path = broken_file(tmp_path)
    out = run(make_recipe(tmp_path, [{"format": "preference", "path": str(path)}], on_error="skip", test_size=0))
    source = json.loads((out / "report.json").read_text())["sources"][0]
    assert source["read"] == 7 and source["kept"] == {"preference": 2} and source["dropped"] == {"malformed": 5}
    reported = [(e["location"], e["reason"]) for e in source["errors"]]
    assert len(reported) == len(EXPECTED_PROBLEMS)
    for (location, reason), (line, expected) in zip(reported, EXPECTED_PROBLEMS):
        assert location == f"{path}:{line}" and reason.startswith(expected)
    assert [r["prompt"][0]["content"] for r in read_jsonl(out / "preference/train.jsonl")] in (["Q1?", "Q7?"], ["Q7?", "Q1?"])


def test_identical_pairs_and_duplicates_are_dropped_by_reason(tmp_path):
    rows = [{"prompt": "Hello there?", "chosen": "a", "rejected": "b"},
            {"prompt": "Hello there?", "chosen": "a", "rejected": "b"},  # exact duplicate
            {"prompt": "hello,  THERE", "chosen": "c", "rejected": "d"},  # same normalized prompt
            {"prompt": "Other?", "chosen": "same", "rejected": "same"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = run(make_recipe(tmp_path, [{"format": "preference", "path": str(path)}]))
    dropped = json.loads((out / "report.json").read_text())["sources"][0]["dropped"]
    assert dropped == {"duplicate": 1, "duplicate_prompt": 1, "chosen_equals_rejected": 1}


def test_mt_bench_contamination_is_dropped(tmp_path):
    questions = require_shared_data("mt_bench/question.jsonl")
    first_turn = read_jsonl(questions)[0]["turns"][0]
    rows = [{"prompt": f"Please help. {first_turn}", "chosen": "a", "rejected": "b"},
            {"prompt": "Compose a haiku about travel in Hawaii.", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = run(make_recipe(tmp_path, [{"format": "preference", "path": str(path)}], test_size=0,
                          decontamination={"question_files": [str(questions)], "ngram": 8, "threshold": 0.5}))
    assert json.loads((out / "report.json").read_text())["sources"][0]["dropped"] == {"contaminated": 1}
    assert read_jsonl(out / "preference/train.jsonl")[0]["prompt"][0]["content"].startswith("Compose a haiku")


def test_hh_rlhf_slice_with_weights_caps_and_sft_from_chosen(tmp_path):
    online = {"format": "hh_rlhf", "path": str(require_shared_data("hh_rlhf/helpful_online_test.jsonl")), "max_rows": 100,
              "sft_from_chosen": True}
    harmless = {"format": "hh_rlhf", "path": str(require_shared_data("hh_rlhf/harmless_base_test.jsonl")), "weight": 0.5,
                "max_rows": 50}
    out = run(make_recipe(tmp_path, [online, harmless], on_error="skip"))
    first, second = json.loads((out / "report.json").read_text())["sources"]
    assert first["kept"]["preference"] + sum(first["dropped"].values()) - first["dropped"].get("duplicate", 0) >= 100
    assert first["kept"]["sft"] > 0
    assert second["dropped"]["not_sampled"] > 20 and second["read"] < 200


def test_unknown_format_and_missing_path_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"data.sources\[0\].format is 'hh'"):
        make_recipe(tmp_path, [{"format": "hh", "path": "x.jsonl"}])
    with pytest.raises(RecipeError, match="set exactly one of path"):
        make_recipe(tmp_path, [{"format": "hh_rlhf"}])


def test_real_data_recipe_parses():
    recipe = load_recipe(REPO / "recipes" / "hh-rlhf-mixtral.yaml")
    assert recipe.model.name_or_path == "mistralai/Mixtral-8x7B-v0.1"
    assert recipe.model.lora.targets == ["attention", "experts"]
    assert {source.format for source in recipe.data.sources} == {"hh_rlhf"}
    assert recipe.data.decontamination is not None


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_parquet_and_csv_sources_give_the_same_pairs_as_jsonl(tmp_path, suffix):
    from datasets import Dataset

    rows = [{"question": f"What is {n} + {n}?", "chosen": f"It is {2 * n}.", "rejected": f"{2 * n + 1}"} for n in range(40)]
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = Dataset.from_list(rows)
    getattr(table, f"to_{suffix}")(str(tmp_path / f"pairs.{suffix}"))
    outputs = {}
    for name in ("jsonl", suffix):
        source = {"format": "preference", "path": str(tmp_path / f"pairs.{name}"), "columns": {"prompt": "question"}}
        recipe = make_recipe(tmp_path / name, [source], test_size=0)
        outputs[name] = read_jsonl(run(recipe) / "preference" / "train.jsonl")
    assert len(outputs[suffix]) == 40 and outputs[suffix] == outputs["jsonl"]


def test_a_bad_csv_record_is_reported_with_its_line(tmp_path):
    (tmp_path / "pairs.csv").write_text('prompt,chosen,rejected\nHi?,"Hello,\nfriend.",Go.\nBye?,,Stay.\n')
    recipe = make_recipe(tmp_path, [{"format": "preference", "path": "pairs.csv"}], test_size=0)
    with pytest.raises(DataError, match=r"pairs.csv:4: .*chosen"):
        run(recipe)


@pytest.mark.parametrize("bad_rows, expected", [
    (1, "f.jsonl:2: not valid JSON (x); truncated line? Fix the rows"),
    (2, "f.jsonl:2: not valid JSON (x); truncated line? 1 more malformed row in s. Fix the rows"),
    (3, "f.jsonl:2: not valid JSON (x); truncated line? 2 more malformed rows in s. Fix the rows"),
])
def test_the_malformed_row_message_reads_as_english(bad_rows, expected):
    from data_prep.records import DataError, Problem
    from data_prep.source_stats import SourceStats

    stats = SourceStats("s")
    for line in range(2, 2 + bad_rows):
        stats.problem(Problem(f"f.jsonl:{line}", "not valid JSON (x); truncated line?"))
    with pytest.raises(DataError) as error:
        stats.fail_if_malformed()
    assert str(error.value).startswith(expected)
