"""`make bench`: every benchmark, side by side measurements printed as they finish."""

from benchmarks import prep_bench, qlora_bench

prep_bench.main()
qlora_bench.main([])
