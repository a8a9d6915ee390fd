#!/usr/bin/env python
"""kNN accuracy of a run's trunk (DINO's protocol): see vissl_vit/benchmark/nearest_neighbor.py.

python tools/nearest_neighbor_test.py config=quickstart/mocov3_fashion_mnist
python tools/nearest_neighbor_test.py config=quickstart/mocov3_fashion_mnist --random-init
"""

import sys

from vissl_vit.benchmark.nearest_neighbor import main

if __name__ == "__main__":
    sys.exit(main())
