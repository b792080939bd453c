"""The peer benchmark (issue 4); the same as ``hfguard bench``.

Run:  python benchmarks/run.py --dataset digits          (about 3 minutes on 2 cores)
      python benchmarks/run.py --dataset fashion-mnist   (small CNN and small ResNet)
Writes benchmarks/results/<dataset>.json, <dataset>.md, <dataset>-<arch>-roc.png and -hist.png.
"""

import sys

from hfguard.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
