"""The GPU check in its CPU mode (tiny sizes, the same code otherwise), so that it still runs when a GPU is lent:
every part reports its figures, the results files are written where asked (never over the committed ones), and a
part that runs past its budget is stopped and reported while the others go on.

The parts run as two checks (`--parts`), which two pytest-xdist workers take side by side: the side-by-side parts
with expert_parallel, and the speed benchmark's parts. The serving part runs as the check runs it in
tests/test_serving_check.py."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
# Each part in one of the two runs (a part added to the check must join one of them).
SIDE_BY_SIDE = ["pipeline", "conformance", "plan_memory", "expert_parallel"]
SPEED = ["qlora", "speed", "equality"]  # equality uses the speed part's prepared run


def test_the_two_runs_and_the_serving_test_cover_every_part():
    assert sorted(SIDE_BY_SIDE + SPEED + ["serving"]) == sorted(gpu_check.PARTS)


def cpu_check(out: Path, parts: list[str]) -> tuple[dict, str]:
    """`python -m benchmarks.gpu_check --cpu --parts PARTS --out OUT`: (the report's parts, its markdown), each part
    in its line of the markdown; the committed results file is left as it was."""
    committed = ROOT / "benchmarks" / "results-gpu.md"
    before = committed.read_text() if committed.is_file() else None
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--parts", ",".join(parts),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    parts_found = json.loads((out / "results-gpu.json").read_text())["parts"]
    assert list(parts_found) == parts, result.stderr[-5000:]  # in the order asked for
    markdown = (out / "results-gpu.md").read_text()
    assert all(f"| {name} | {part['status']} |" in markdown for name, part in parts_found.items())
    assert (committed.read_text() if committed.is_file() else None) == before
    return parts_found, markdown


@pytest.mark.slow
@pytest.mark.timeout(1500)  # pipeline, conformance and plan_memory side by side, then 2 expert_parallel processes
def test_cpu_mode_runs_the_side_by_side_parts_and_expert_parallel(tmp_path):
    parts, markdown = cpu_check(tmp_path, SIDE_BY_SIDE)
    statuses = {name: part["status"] for name, part in parts.items()}
    # at tiny sizes only the equality and the one conformance test run on the CPU are judged; the rest is measured
    assert statuses == {"pipeline": "MEASURED", "conformance": "PASS", "plan_memory": "MEASURED",
                        "expert_parallel": "PASS"}, parts
    assert parts["conformance"]["figures"]["passed"] == 1
    assert set(parts["pipeline"]["figures"]["overall"]) == {"base", "sft", "dpo"}
    # the plan set against the peak of the stage a user runs; the full fine-tune (no library imported after the
    # baseline) lands within the GPU verdict's 20%
    plan = {row["row"]: row for row in parts["plan_memory"]["figures"]["rows"]}
    assert list(plan) == [row["name"] for row in gpu_check.CPU_SIZES["plan_memory"]["rows"]]
    assert all(row["plan_mib"] > 0 and row["measured_mib"] > 0 for row in plan.values())
    assert plan["OLMoE-like full SFT, 4 x 512 tokens"]["ratio"] == pytest.approx(1, abs=0.2)
    assert "## Memory plan against the measured peak" in markdown


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_mode_runs_the_speed_parts(tmp_path):
    parts, markdown = cpu_check(tmp_path, SPEED)
    statuses = {name: part["status"] for name, part in parts.items()}
    assert statuses == {"qlora": "MEASURED", "speed": "MEASURED", "equality": "PASS"}, parts
    qlora = parts["qlora"]["figures"]
    assert qlora["model_ratio_a_b"] < 0.5 and 0 < qlora["nf4_share"] < 1  # NF4 experts: a fraction of the bf16 model
    rows = {row["variant"]: row for row in parts["speed"]["figures"]["rows"]}
    assert set(rows) == set(gpu_check.SPEED_VARIANTS_CPU) and all(row["tokens_per_s"] > 0 for row in rows.values())
    assert "## DPO and SFT speed vs TRL" in markdown and "## Expert QLoRA memory" in markdown


def test_a_part_past_its_budget_is_stopped_and_reported(tmp_path):
    start = time.perf_counter()
    result = gpu_check.run_part("qlora", "cpu", tmp_path / "no-data", tmp_path, budget=1)
    assert result["status"] == "TIMEOUT" and "budget of 1 s" in result["verdict"]
    assert time.perf_counter() - start < 30  # killed with its children, not waited for
