#!/usr/bin/env python
"""Train or evaluate from a YAML config: VISSL's command line.

    python tools/run_distributed_engines.py config=quickstart/vit_fashion_mnist config.OPTIMIZER.num_epochs=2

See defaults.yaml for every key, and README.md for the tour.
"""

import signal
import sys

# A scheduler may preempt the job while torch is still being imported (seconds): record SIGTERM and
# SIGUSR1 from the first line, so that the run stops cleanly (exit 0) instead of dying from them.
_early: list[int] = []
for _s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_s, lambda signum, _frame: _early.append(signum))

from vissl_vit.engine.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(early_signals=_early))
