"""`make bench`: every benchmark, side by side measurements printed as they finish."""

import sys

from benchmarks import dpo_bench, prep_bench, qlora_bench

prep_bench.main()
qlora_bench.main([])
dpo_bench.main(quick="--quick" in sys.argv)
