"""The package version. Its own module so inner modules (a checkpoint records it) can read it
without importing the package root."""
__version__ = "0.1.0"
