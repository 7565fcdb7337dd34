"""Superseded by ``bench_sparse_formats.py`` (profiler timing, all sparse formats); kept so the
command in docs/sparsity.md still runs: benchmarks the 2:4 format only.

    python scripts/bench_sparse_matmul.py [--cpu_smoke] [--budget_s S]
      == python scripts/bench_sparse_formats.py --formats 2:4 [...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    import bench_sparse_formats
    sys.argv[1:1] = ["--formats", "2:4"]
    bench_sparse_formats.main()
