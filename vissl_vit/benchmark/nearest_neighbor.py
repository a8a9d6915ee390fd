"""kNN evaluation of a trunk from the command line: the nearest_neighbor engine with shortcuts.

    python tools/nearest_neighbor_test.py config=benchmark/nearest_neighbor/fashion_mnist/eval_knn \\
        --weights ./runs/quickstart_mocov3_fashion_mnist
    python tools/nearest_neighbor_test.py config=benchmark/nearest_neighbor/fashion_mnist/eval_knn --random-init

is ``tools/run_distributed_engines.py`` with ``config.ENGINE_NAME=nearest_neighbor``, so it runs on
several processes the same way. The options are shortcuts for overrides:

    --weights PATH     config.MODEL.WEIGHTS_INIT.PARAMS_FILE=PATH (a file, or a run folder: its newest checkpoint)
    --random-init      config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True, no PARAMS_FILE (the baseline)
    --k 10,20          config.NEAREST_NEIGHBOR.TOPK=[10,20]
    --temperature T    config.NEAREST_NEIGHBOR.TEMPERATURE=T
    --feature NAME     extract and evaluate this trunk feature (e.g. concatCLS4)

Results are printed and appended to <CHECKPOINT.DIR>/nearest_neighbor.json.
"""

from __future__ import annotations

import sys

from vissl_vit.config import compose_config
from vissl_vit.utils.cli import cli_main, split_options

USAGE = """usage: python tools/nearest_neighbor_test.py config=<path> [config.KEY=value ...]
                                         [--weights PATH | --random-init] [--k 10,20,100,200]
                                         [--temperature 0.07] [--feature lastCLS]
"""


def overrides_for(argv: list[str]) -> list[str]:
    """The tool's command line -> config arguments for the nearest_neighbor engine."""
    args, opts = split_options(
        argv,
        values={
            "--weights": ("weights", str),
            "--k": ("k", lambda v: [int(k) for k in v.split(",")]),
            "--temperature": ("temperature", float),
            "--feature": ("feature", str),
        },
        switches={"--random-init": ("random_init", True)},
        defaults={"weights": None, "random_init": False, "k": None, "temperature": None, "feature": None},
        usage=USAGE,
    )
    args = [*args, "config.ENGINE_NAME=nearest_neighbor"]
    if opts["weights"] is not None:
        args.append(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE='{opts['weights']}'")
    if opts["random_init"]:
        args += ["config.MODEL.WEIGHTS_INIT.PARAMS_FILE=''", "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True"]
    if opts["k"] is not None:
        args.append(f"config.NEAREST_NEIGHBOR.TOPK=[{','.join(map(str, opts['k']))}]")
    if opts["temperature"] is not None:
        args.append(f"config.NEAREST_NEIGHBOR.TEMPERATURE={opts['temperature']}")
    if opts["feature"] is not None:
        args += [
            f"config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[{opts['feature']},[Identity,[]]]]",
            f"config.NEAREST_NEIGHBOR.FEATURE={opts['feature']}",
        ]
    return args


def run(argv: list[str]) -> None:
    from vissl_vit.engine.launch import launch

    launch(compose_config(overrides_for(argv)))


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
