"""Imported at start-up by every Python process that has this folder on its PYTHONPATH (benchmarks/plan_memory.py
puts it there for a launch of several processes). In a training process of an accelerate launch (RANK set) and with
MOETUNE_PEAK_DIR set, it imports the libraries every stage loads, takes the peak resident set then as the baseline
(as plan_memory's single-process MEASURE does), and at exit writes the baseline and the process's peak to
$MOETUNE_PEAK_DIR/rank-N.json. Anywhere else it does nothing."""

import os

if os.environ.get("MOETUNE_PEAK_DIR") and "RANK" in os.environ:
    import atexit
    import json
    import resource

    import datasets  # noqa: F401
    import finetune.cli  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def write_peak() -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        path = os.path.join(os.environ["MOETUNE_PEAK_DIR"], f"rank-{os.environ['RANK']}.json")
        with open(path, "w") as handle:
            json.dump({"rank": int(os.environ["RANK"]), "base": BASE, "peak": peak}, handle)

    atexit.register(write_peak)
