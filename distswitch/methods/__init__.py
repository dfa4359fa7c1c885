"""Training methods under one engine: dense, switch, magnitude, slimming (registered by name)."""

from distswitch.methods import baselines, switch  # noqa: F401  (registers the methods)
from distswitch.methods.base import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
