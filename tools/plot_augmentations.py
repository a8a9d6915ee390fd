#!/usr/bin/env python
"""The first training batch as the model sees it (multi-crop views, mixup), as a PNG: see
vissl_vit/visualize/augmentations.py.

python tools/plot_augmentations.py config=test/quick_swav --out swav_views.png
python tools/plot_augmentations.py --run ./runs/my_run --samples 4 --batches 2
"""

import sys

from vissl_vit.visualize.augmentations import main

if __name__ == "__main__":
    sys.exit(main())
