"""The GPU check's serving part where it cannot serve (no GPU here, neither vLLM nor SGLang installed): it runs, as
the GPU check runs it, to a skip message that names each server and why, and the part is reported SKIPPED."""

import re

from benchmarks import gpu_check


def test_the_serving_part_says_for_each_server_that_and_why_it_was_skipped(tmp_path):
    result = gpu_check.run_part("serving", "cpu", tmp_path / "no-data", tmp_path, budget=120)
    assert result["status"] == "SKIPPED", result
    for name, package in (("vLLM", "vllm"), ("SGLang", "sglang")):
        why = rf"{name}: skipped: ({package} is not importable here|{name} serves on a GPU; none here)"
        assert re.search(why, result["verdict"]), result["verdict"]
