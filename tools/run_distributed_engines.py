#!/usr/bin/env python
"""Train or evaluate from a YAML config: VISSL's command line.

    python tools/run_distributed_engines.py config=quickstart/vit_fashion_mnist config.OPTIMIZER.num_epochs=2

See defaults.yaml for every key, and README.md for the tour.
"""

import sys

from vissl_vit.engine.launch import main

if __name__ == "__main__":
    sys.exit(main())
