#!/usr/bin/env python
"""kNN retrieval of a run's trunk: test queries and their nearest training images, as a PNG: see
vissl_vit/visualize/retrieval.py.

python tools/plot_retrieval.py ./runs/my_run                   # -> ./runs/my_run/pictures/retrieval.png
python tools/plot_retrieval.py ./runs/my_run --queries 8 --k 6 --max-train 5000 --out knn.png
"""

import sys

from vissl_vit.visualize.retrieval import main

if __name__ == "__main__":
    sys.exit(main())
