#!/usr/bin/env python
"""Training curves of one or several runs as one PNG: see vissl_vit/visualize/curves.py.

python tools/plot_curves.py ./runs/my_run                      # -> ./runs/my_run/pictures/curves.png
python tools/plot_curves.py ./runs/ln ./runs/bn --labels LN BN --out ln_vs_bn.png
"""

import sys

from vissl_vit.visualize.curves import main

if __name__ == "__main__":
    sys.exit(main())
