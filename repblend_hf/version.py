"""The package version, in a module of its own so that every module can stamp artefacts without importing the
package ``__init__`` (``setup.cfg`` reads it from here too)."""

__version__ = "0.1.0"
