"""vissl_vit: VISSL re-imagined for Vision Transformers.

defaults.yaml and configs/ live at the repository root. An editable install finds them there; a
regular install (``pip install .``) copies them into the package as vissl_vit/_resources/.
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithResources(build_py):
    """Copy defaults.yaml and configs/ into the built package (vissl_vit/_resources)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # editable installs read them from the checkout
            return
        dest = os.path.join(self.build_lib, "vissl_vit", "_resources")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(os.path.join(HERE, "defaults.yaml"), dest)
        shutil.copytree(os.path.join(HERE, "configs"), os.path.join(dest, "configs"), dirs_exist_ok=True)


TEST_REQUIRES = ["pytest>=8", "pytest-timeout", "timm>=1.0"]

setup(
    name="vissl_vit",
    version="0.1.0",
    description="Train Vision Transformers, supervised or self-supervised, from a YAML file (VISSL's interface).",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vissl_vit", "vissl_vit.*"]),
    package_data={"vissl_vit.config": ["vissl_vocabulary.yaml"]},  # VISSL's key vocabulary (issue 11)
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "numpy",
        "pillow",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "faiss-cpu>=1.7",
        "safetensors>=0.4",
        # pictures of a run (tools/plot_*.py, HOOKS.PICTURES)
        "matplotlib>=3.5",
        # Shampoo (OPTIMIZER.name: shampoo): its ScalableShampoo, with grafting
        "pytorch-optimizer>=4.0",
    ],
    # parity: TensorFlow, for the optional tests of big_vision's crop, resize and RandAugment against
    # TensorFlow's own ops (skipped without it)
    extras_require={"test": TEST_REQUIRES, "dev": TEST_REQUIRES + ["ruff"], "parity": ["tensorflow-cpu"]},
    entry_points={"console_scripts": ["vissl-vit-train=vissl_vit.engine.launch:main"]},
    cmdclass={"build_py": BuildWithResources},
)
