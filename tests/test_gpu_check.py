"""The GPU check in its CPU mode (tiny sizes, the same code otherwise), so that it still runs when a GPU is lent:
every part reports its figures, the results files are written where asked (never over the committed ones), and a
part that runs past its budget is stopped and reported while the others go on."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # every part in turn, the expert_parallel one with 2 training processes
def test_cpu_mode_runs_every_part_and_writes_its_figures(tmp_path):
    committed = ROOT / "benchmarks" / "results-gpu.md"
    before = committed.read_text() if committed.is_file() else None
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results-gpu.json").read_text())
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    statuses = {name: part["status"] for name, part in parts.items()}
    # at tiny sizes only the equality and the one conformance test run on the CPU are judged; the rest is measured
    assert statuses == {"pipeline": "MEASURED", "conformance": "PASS", "qlora": "MEASURED", "speed": "MEASURED",
                        "equality": "PASS", "plan_memory": "MEASURED", "expert_parallel": "PASS",
                        "serving": "SKIPPED"}, result.stderr[-5000:]
    assert parts["conformance"]["figures"]["passed"] == 1
    assert set(parts["pipeline"]["figures"]["overall"]) == {"base", "sft", "dpo"}
    qlora = parts["qlora"]["figures"]
    assert qlora["model_ratio_a_b"] < 0.5 and 0 < qlora["nf4_share"] < 1  # NF4 experts: a fraction of the bf16 model
    rows = {row["variant"]: row for row in parts["speed"]["figures"]["rows"]}
    assert set(rows) == set(gpu_check.SPEED_VARIANTS_CPU) and all(row["tokens_per_s"] > 0 for row in rows.values())
    # the plan set against the peak of the stage a user runs; the full fine-tune (no library imported after the
    # baseline) lands within the GPU verdict's 20%
    plan = {row["row"]: row for row in parts["plan_memory"]["figures"]["rows"]}
    assert list(plan) == [row["name"] for row in gpu_check.CPU_SIZES["plan_memory"]["rows"]]
    assert all(row["plan_mib"] > 0 and row["measured_mib"] > 0 for row in plan.values())
    assert plan["OLMoE-like full SFT, 4 x 512 tokens"]["ratio"] == pytest.approx(1, abs=0.2)
    markdown = (tmp_path / "results-gpu.md").read_text()
    assert all(f"| {name} | {status} |" in markdown for name, status in statuses.items())
    assert "## Memory plan against the measured peak" in markdown
    assert (committed.read_text() if committed.is_file() else None) == before


def test_a_part_past_its_budget_is_stopped_and_reported(tmp_path):
    start = time.perf_counter()
    result = gpu_check.run_part("qlora", "cpu", tmp_path / "no-data", tmp_path, budget=1)
    assert result["status"] == "TIMEOUT" and "budget of 1 s" in result["verdict"]
    assert time.perf_counter() - start < 30  # killed with its children, not waited for
