"""Run the conformance matrix (tests/test_families.py; tests/test_export.py for the export columns) and print it as
a markdown table: family x check.

    python -m tests.helpers.conformance_matrix [--page docs/families.md] [pytest options]

Each cell is the outcome of one parametrised test: "pass", "FAIL", or "refused" with the reason the code gives
(footnoted under the table). With --page, the table replaces the block between the page's
`<!-- conformance-matrix -->` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

CHECKS = {  # test function -> column header
    "test_a_roles_found_only_adapters_train_router_frozen": "(a) roles, router frozen",
    "test_b_expert_load_counts_real_tokens_times_top_k": "(b) expert load",
    "test_c_balancing_term_present_and_logged": "(c) balancing logged",
    "test_d_packed_sft_and_prompt_shared_dpo_equal_trl": "(d) packed SFT/DPO = TRL",
    "test_e_nf4_expert_lora_equals_peft_on_rounded_weights": "(e) NF4 experts = PEFT",
    "test_f_save_load_merge_round_trip_gives_identical_logits": "(f) save/load/merge",
    "test_g_zero3_leaf_and_fsdp2_wrap_classes_found": "(g) ZeRO-3/FSDP2 classes",
    "test_h_export_merged_and_peft_reload_to_the_trained_logits": "(h) export merged/peft",
    "test_i_export_vllm_reloads_to_the_trained_logits": "(i) export vLLM",
}
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
        if report.skipped:
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
    for family in families.FAMILIES:
        row = []
        for check in CHECKS:
            cell = cells.get((check, family), "not run")
            if cell.startswith("refused: "):
                reason = cell.removeprefix("refused: ")
                if reason not in reasons:
                    reasons.append(reason)
                cell = f"refused [{reasons.index(reason) + 1}]"
            row.append(cell)
        rows.append(f"| {family} | " + " | ".join(row) + " |")
    notes = [f"[{number}] {reason}" for number, reason in enumerate(reasons, 1)]
    return "\n".join(rows) + ("\n\n" + "\n".join(f"{note}  " for note in notes) if notes else "")


def replace_in_page(page: Path, text: str) -> None:
    content = page.read_text()
    start, end = content.index(MARKER), content.rindex(MARKER)
    page.write_text(content[:start + len(MARKER)] + "\n" + text + "\n" + content[end:])


def main(argv: list[str]) -> int:
    page = None
    if argv[:1] == ["--page"]:
        page, argv = Path(argv[1]), argv[2:]
    collector = Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(Path(__file__).parents[1] / "test_families.py"),
                        *(f"{Path(__file__).parents[1] / 'test_export.py'}::{check}" for check in CHECKS
                          if check.startswith(("test_h_", "test_i_"))), *argv],
                       plugins=[collector])
    text = table(collector.cells)
    print(text)
    if page is not None:
        replace_in_page(page, text)
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
