"""The package version (one place; ``hfguard.__version__`` and saved files read it)."""

__version__ = "0.8.5"
