"""The peer benchmark (issue 4): the same as ``hfguard bench`` (its JSON records the ``hfguard bench ...`` form).

Run:  python benchmarks/run.py --dataset digits          (about 1.5 minutes on 2 cores)
      python benchmarks/run.py --dataset fashion-mnist   (small CNN and small ResNet, about 28 minutes)
Writes benchmarks/results/<dataset>.json, <dataset>.md, <dataset>-<arch>-roc.png, -hist.png and -scores.npz.
"""

import sys

from hfguard.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
