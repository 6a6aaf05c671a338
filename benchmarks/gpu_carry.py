"""What the lent GPU machine needs beside the repository, made here: it reaches no package registry and gets only the
repository's working tree (at most 64 MiB with what travels beside it), not ../shared.

- .whl/: wheels of the Python packages its image lacks or has too old (its python3 is 3.12 with torch, accelerate,
  tokenizers, safetensors, huggingface_hub and the rest of datasets' needs), for CPython 3.12 on x86-64 Linux.
  bitsandbytes' wheel (43 MB) is slimmed to the CUDA 13 libraries that image's torch (cu130) loads.
- .gpu_data/hh_rlhf/: the first rows of the hh-rlhf files the speed benchmark reads (benchmarks/gpu_check.py --data).

Both folders are git-ignored; the `run` call carries them (benchmarks/GPU_RUN.md).
Run: python -m benchmarks.gpu_carry   (make gpu-carry)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks.dpo_bench import HH_FILES, SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DATA = ROOT / ".gpu_data"
# The versions pyproject.toml's ranges resolve to here, of the packages the GPU image lacks (trl, datasets and its
# dill and multiprocess, bitsandbytes) or has older than pyproject.toml allows (transformers 5.17, peft).
PACKAGES = ["transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1",
            "multiprocess==0.70.19", "bitsandbytes==0.50.2"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# bitsandbytes loads libbitsandbytes_cuda<torch's CUDA version>.so; the GPU image's torch is built for CUDA 13.0.
KEEP_CUDA = ("cuda13",)
# hh-rlhf pairs copied per file: enough for the tokenizer and every variant's batches, about 5 MB in all.
ROWS = 1000


def download_wheels() -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms,
                    "-d", str(WHEELS), *PACKAGES], check=True)


def slim_bitsandbytes() -> None:
    """Rewrite bitsandbytes' wheel without the native libraries of other CUDA and ROCm versions."""
    (wheel,) = WHEELS.glob("bitsandbytes-*.whl")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            name = Path(item.filename).name
            other_gpu = name.startswith("libbitsandbytes_") and "cpu" not in name and not name[16:].startswith(KEEP_CUDA)
            if not other_gpu:
                target.writestr(item, source.read(item))
    slim.replace(wheel)


def export_data(source: Path = SHARED_DATA, rows: int = ROWS) -> None:
    """Copy the first `rows` pairs of each hh-rlhf file the speed benchmark reads, and the data's license."""
    target = DATA / "hh_rlhf"
    shutil.rmtree(DATA, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copyfile(source / "hh_rlhf" / "LICENSE-hh-rlhf-MIT.txt", target / "LICENSE-hh-rlhf-MIT.txt")
    for name in HH_FILES:
        with open(source / "hh_rlhf" / f"{name}.jsonl") as handle:
            head = [line for _, line in zip(range(rows), handle)]
        (target / f"{name}.jsonl").write_text("".join(head))


def main() -> None:
    if not (SHARED_DATA / "hh_rlhf").is_dir():
        sys.exit(f"{SHARED_DATA}/hh_rlhf is missing: the GPU check's speed part reads the shared hh-rlhf files.")
    download_wheels()
    slim_bitsandbytes()
    export_data()
    sizes = {folder.name: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
             for folder in (WHEELS, DATA)}
    print(", ".join(f"{name} {mib:.1f} MiB" for name, mib in sizes.items()) + " ready to carry (limit 64 MiB in all, "
          "with the repository)")


if __name__ == "__main__":
    main()
