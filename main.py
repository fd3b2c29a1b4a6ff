"""Train any model of the project from YAML configs: `python main.py --base configs/... -t --gpus 0,`."""

import sys

from ldm.cli import run
from ldm.train import main

if __name__ == "__main__":
    sys.exit(run(main))
