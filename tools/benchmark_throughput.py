#!/usr/bin/env python
"""Throughput of a config's model next to timm's, in one process: see vissl_vit/benchmark/throughput.py.

python tools/benchmark_throughput.py config=benchmark/throughput/vit_tiny_32
python tools/benchmark_throughput.py config=benchmark/throughput/vit_s16_224 --batch-size 16 --json out.json
"""

import sys

from vissl_vit.benchmark.throughput import main

if __name__ == "__main__":
    sys.exit(main())
