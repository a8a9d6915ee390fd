#!/usr/bin/env python
"""Attention maps of a run folder, as PNG: see vissl_vit/visualize/attention.py.

python tools/plot_attention.py ./runs/my_run                        # RUN/pictures/attention.png
python tools/plot_attention.py ./runs/my_run --blocks 0 3 6 9 --heads 0 1 --images 6 --matrices
python tools/plot_attention.py ./runs/my_run --weights model_final.safetensors --out /tmp/attn.png
"""

import sys

from vissl_vit.visualize.attention import main

if __name__ == "__main__":
    sys.exit(main())
