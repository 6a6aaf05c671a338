"""Prep-stage benchmark: rows/s on the real hh-rlhf files (with MT-Bench decontamination), and peak memory for a
generated one-million-row source against a 100k-row one (streaming: the peak should not grow with the rows).

Run: python -m benchmarks.prep_bench   (about 2 minutes on a 2-core CPU; needs ../shared/data)
Each measurement runs in its own process, so ru_maxrss is that run's peak resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILES = ("helpful_base_test", "helpful_online_test", "helpful_rejection_sampled_test", "harmless_base_test")


def hh_rlhf_recipe(run_dir: Path) -> dict:
    return {"run_dir": str(run_dir), "model": {"init": {}}, "data": {
        "on_error": "skip",
        "decontamination": {"question_files": [str(SHARED_DATA / "mt_bench" / "question.jsonl")]},
        "sources": [{"format": "hh_rlhf", "path": str(SHARED_DATA / "hh_rlhf" / f"{name}.jsonl")} for name in HH_FILES]}}


def generated_recipe(run_dir: Path, path: Path) -> dict:
    return {"run_dir": str(run_dir), "model": {"init": {}},
            "data": {"dedup": "exact", "sources": [{"format": "preference", "path": str(path)}]}}


def write_generated_source(path: Path, rows: int) -> None:
    with open(path, "w") as handle:
        for index in range(rows):
            handle.write(json.dumps({"prompt": f"What is {index} plus one?", "chosen": f"It is {index + 1}.",
                                     "rejected": f"It is {index}."}) + "\n")


def measure_in_child(recipe: dict) -> dict:
    """Run the stage in a fresh process; returns its wall time, rows read and peak memory."""
    code = ("import json, sys, time, resource; from finetune.config.parsing import parse_recipe; from finetune.stages.prepare import run;"
            "recipe = parse_recipe(json.loads(sys.argv[1]), '<bench>'); start = time.perf_counter();"
            "out = run(recipe); seconds = time.perf_counter() - start;"
            "report = json.loads((out / 'report.json').read_text());"
            "print(json.dumps({'seconds': seconds, 'rows': sum(s['read'] for s in report['sources']),"
            "'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(recipe)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_peak_mib() -> float:
    """Peak memory of a process that only parses a recipe (which imports TRL, transformers and torch)."""
    code = ("import resource; import finetune.stages.prepare; from finetune.config.parsing import parse_recipe;"
            "parse_recipe({'run_dir': 'x', 'model': {'init': {}}}, '<bench>');"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    if not (SHARED_DATA / "hh_rlhf").is_dir():
        sys.exit(f"{SHARED_DATA}/hh_rlhf is missing: the benchmark reads the shared hh-rlhf files.")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        hh = measure_in_child(hh_rlhf_recipe(folder / "hh"))
        print(f"hh-rlhf (4 files, MT-Bench decontamination): {hh['rows']} rows in {hh['seconds']:.1f} s "
              f"= {hh['rows'] / hh['seconds']:,.0f} rows/s")
        print(f"parsing a recipe only (imports torch, transformers, trl): peak {baseline_peak_mib():.0f} MiB")
        for rows in (100_000, 1_000_000):
            path = folder / f"generated-{rows}.jsonl"
            write_generated_source(path, rows)
            result = measure_in_child(generated_recipe(folder / f"run-{rows}", path))
            print(f"generated {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB): {result['seconds']:.1f} s, "
                  f"{rows / result['seconds']:,.0f} rows/s, peak {result['peak_mib']:.0f} MiB")
            path.unlink()


if __name__ == "__main__":
    main()
