#!/usr/bin/env python
"""Convert weights between vissl_vit checkpoints and timm ViT state dicts: see vissl_vit/models/convert.py.

python tools/convert_weights.py --to timm ./runs/quickstart_vit_fashion_mnist vit_fmnist_timm.pth
python tools/convert_weights.py --to vissl_vit dino_deitsmall16_pretrain.pth dino_vits16.torch
"""

import sys

from vissl_vit.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
