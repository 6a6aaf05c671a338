"""Run the conformance matrix over every MoE family of the installed transformers and print it as a markdown
table: family x check, one row per family (families.moe_model_types).

    python -m tests.helpers.conformance_matrix [--page docs/families.md] [pytest options]
    python -m tests.helpers.conformance_matrix [--page docs/families.md] --from-logs LOG...  (`pytest -vv -rA` outputs)

It runs tests/test_every_family.py (roles through the CLI loader; the CLI chain prep -> LoRA SFT -> LoRA DPO ->
eval -> merge), tests/test_families.py and tests/test_export.py's export columns with MOETUNE_ALL_FAMILIES=1, so every family, not the suite's sample.
Each cell is the outcome of one parametrised test: "pass", "FAIL", "refused" with the reason the code gives, or
"fails" with the reason a family cannot pass (footnoted under the table). With --page, the table replaces the
block between the page's `<!-- conformance-matrix -->` markers.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

CHECKS = {  # test function -> column header
    "test_roles_found_and_default_lora_trains_with_the_router_frozen": "roles, LoRA step (CLI loader)",
    "test_cli_chain_lora_sft_dpo_eval_merge": "CLI: SFT->DPO->eval->merge",
    "test_a_roles_found_only_adapters_train_router_frozen": "(a) roles, router frozen",
    "test_b_expert_load_counts_real_tokens_times_top_k": "(b) expert load",
    "test_c_balancing_term_present_and_logged": "(c) balancing logged",
    "test_d_packed_sft_and_prompt_shared_dpo_equal_trl": "(d) packed SFT/DPO = TRL",
    "test_e_nf4_expert_lora_equals_peft_on_rounded_weights": "(e) NF4 experts = PEFT",
    "test_f_save_load_merge_round_trip_gives_identical_logits": "(f) save/load/merge",
    "test_g_zero3_leaf_and_fsdp2_wrap_classes_found": "(g) ZeRO-3/FSDP2 classes",
    "test_h_export_merged_and_peft_reload_to_the_trained_logits": "(h) export merged/peft",
    "test_i_export_vllm_reloads_to_the_trained_logits": "(i) export vLLM",
    "test_j_router_role_wraps_the_router_and_tracking_reads_through_it": "(j) router role",
    "test_export_sglang_reloads_to_the_trained_logits": "(k) export SGLang",
}
# The serving-format cells (#25's): where one does not pass, the export refuses with the reason the server's loader
# cannot take the adapter (its source read at a named commit); the table counts families passing every other cell too.
SERVING = ("test_i_export_vllm_reloads_to_the_trained_logits", "test_export_sglang_reloads_to_the_trained_logits")
MARKER = "<!-- conformance-matrix -->"


class Collector:
    """A pytest plugin that keeps each (check, family) outcome."""

    def __init__(self):
        self.cells: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report):
        match = re.match(r".*::(test_\w+)\[(.+)\]$", report.nodeid)
        if not match or match.group(1) not in CHECKS:
            return
        key = (match.group(1), match.group(2))
        if getattr(report, "wasxfail", None):  # an expected failure, with the reason it names
            self.cells[key] = "fails: " + report.wasxfail.removeprefix("reason: ")
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.cells[key] = reason.removeprefix("Skipped: ")
        elif report.failed:
            self.cells[key] = "FAIL"
        elif report.when == "call" and key not in self.cells:
            self.cells[key] = "pass"


def table(cells: dict[tuple[str, str], str]) -> str:
    from finetune.core import families

    reasons: list[str] = []
    rows = ["| family | " + " | ".join(CHECKS.values()) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    for family in families.moe_model_types():
        row = []
        for check in CHECKS:
            cell = cells.get((check, family), "not run")
            kind = next((kind for kind in ("refused", "fails") if cell.startswith(f"{kind}: ")), None)
            if kind:
                reason = cell.removeprefix(f"{kind}: ")
                if reason not in reasons:
                    reasons.append(reason)
                cell = f"{kind} [{reasons.index(reason) + 1}]"
            row.append(cell)
        runs_as = families.text_model_type(family)
        rows.append(f"| {family}{f' (as {runs_as})' if runs_as != family else ''} | " + " | ".join(row) + " |")
    every = families.moe_model_types()
    rows.append(f"| **pass (of {len(every)})** | " + " | ".join(
        str(sum(cells.get((check, family)) == "pass" for family in every)) for check in CHECKS) + " |")
    passing = sum(all(cells.get((check, family)) == "pass" for check in CHECKS) for family in every)
    training = sum(all(cells.get((check, family)) == "pass" for check in CHECKS if check not in SERVING)
                   for family in every)
    refused = sum(all(cells.get((check, family)) == "pass" or cells.get((check, family), "").startswith("refused: ")
                      for check in SERVING) for family in every)
    rows.append(f"\n{passing} of {len(every)} families pass every cell. {training} pass every cell but the serving "
                f"formats ((i) vLLM, (k) SGLang); for {refused}, each serving cell passes or the export refuses "
                f"with the reason that server's loader cannot take the adapter.")
    notes = [f"[{number}] {reason}" for number, reason in enumerate(reasons, 1)]
    return "\n".join(rows) + ("\n\n" + "\n".join(f"{note}  " for note in notes) if notes else "")


def replace_in_page(page: Path, text: str) -> None:
    content = page.read_text()
    start, end = content.index(MARKER), content.rindex(MARKER)
    page.write_text(content[:start + len(MARKER)] + "\n" + text + "\n" + content[end:])


def cells_from_logs(paths: list[str]) -> dict[tuple[str, str], str]:
    """Cells read back from the output of `pytest -vv -rA` runs of the matrix's tests (a run split in parts, or
    one stopped early: its cells not reached stay "not run"). A skipped cell's reason is read from its verbose line
    (`SKIPPED (refused: ...)`; `-vv` keeps it whole); a cell in several logs takes the last log's outcome (a
    re-run of a cell after a fix)."""
    from tests.helpers.family_models import KNOWN

    cells = {}
    for path in paths:
        found = {}
        for line in Path(path).read_text().splitlines():
            verbose = re.match(r"\S+::(test_\w+)\[(.+?)\] (PASSED|FAILED|SKIPPED|XFAIL|ERROR)(?: \((.*)\))?(?:\s+\[ *\d+%\])?\s*$",
                               line)
            summary = re.match(r"XFAIL \S+::(test_\w+)\[(.+?)\] - (.*)", line)
            if summary:
                found[(summary.group(1), summary.group(2))] = "fails: " + summary.group(3)
            elif verbose and verbose.group(1) in CHECKS:
                key, outcome, reason = (verbose.group(1), verbose.group(2)), verbose.group(3), verbose.group(4)
                known = KNOWN.get(key[1])
                if outcome == "SKIPPED" and reason and reason.startswith(("refused: ", "fails: ")):
                    cell = reason
                else:
                    cell = {"PASSED": "pass", "SKIPPED": f"fails: {known[2]}" if known else "skipped",
                            "XFAIL": "fails: an expected failure (its reason: the log's -rA summary)"}.get(outcome, "FAIL")
                found.setdefault(key, cell)
        cells.update(found)
    return cells


def main(argv: list[str]) -> int:
    page = None
    if argv[:1] == ["--page"]:
        page, argv = Path(argv[1]), argv[2:]
    if argv[:1] == ["--from-logs"]:
        text = table(cells_from_logs(argv[1:]))
        print(text)
        if page is not None:
            replace_in_page(page, text)
        return 0
    collector = Collector()
    os.environ["MOETUNE_ALL_FAMILIES"] = "1"
    tests = [str(Path(__file__).parents[1] / name) for name in ("test_every_family.py", "test_families.py")]
    tests += [f"{Path(__file__).parents[1] / 'test_export.py'}::{check}" for check in CHECKS
              if check.startswith(("test_h_", "test_i_"))]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *tests, *argv], plugins=[collector])
    text = table(collector.cells)
    print(text)
    if page is not None:
        replace_in_page(page, text)
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
