"""The core tests' names for recordings to transcribe, which live in :mod:`gateway.testing.speech`."""

from gateway.testing.speech import silence, speak

__all__ = ["silence", "speak"]
