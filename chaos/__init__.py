"""Chaos harness: experiments, pre-flight, guarded runner, our Chaos Toolkit extension, fault proxy."""

from chaos.discover import discover

__all__ = ["discover"]
