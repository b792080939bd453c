"""``hfguard bench``: hfguard next to real peer detectors (pytorch-ood, feature squeezing, SpectralDefense),
under the library's attacks, torchattacks and adaptive attacks. Needs the ``bench`` extra.

Imports flow one way: ``hfguard.bench`` uses the core package, never the reverse.
"""

from hfguard.bench.config import BenchConfig, preset

__all__ = ["BenchConfig", "preset", "run_bench"]


def __getattr__(name: str):
    if name == "run_bench":
        from hfguard.bench.run import run_bench

        return run_bench
    raise AttributeError(f"module 'hfguard.bench' has no attribute {name!r}")
