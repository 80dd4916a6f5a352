"""The package's version, in a module of its own so that the commands that record it need not import the package's
``__init__`` (which imports them)."""

__version__ = "0.1.0"
