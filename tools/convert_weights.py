#!/usr/bin/env python
"""Convert weights between vissl_vit checkpoints and timm ViT state dicts: see vissl_vit/models/convert.py.

python tools/convert_weights.py --to safetensors ./runs/quickstart_vit_fashion_mnist vit_fmnist.safetensors
    # + vit_fmnist.timm.json, the timm.create_model arguments; the call is printed
python tools/convert_weights.py --to timm ./runs/quickstart_vit_fashion_mnist vit_fmnist_timm.pth
python tools/convert_weights.py --to vissl_vit dino_deitsmall16_pretrain.pth dino_vits16.torch
python tools/convert_weights.py --to vissl_vit ViT-B_16.npz vit_b16_in21k.torch   # Google's JAX checkpoints
python tools/convert_weights.py --to vissl_vit model.safetensors vit.torch        # e.g. from the HF hub

A file that pickles Python objects besides tensors (loading it would run the code it names) is
refused unless --allow-pickle-code-execution is given: only for files you trust. The output holds
tensors only, so the engine then loads it without that opt-in.
"""

import sys

from vissl_vit.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
