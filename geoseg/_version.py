"""The package version (its own module, so that stage modules never import the package's public API)."""

__version__ = "0.1.0"
