"""Readers and writers for the traccc/ACTS CSV family and trackfleet's own files; one module per format."""

from producer.io.errors import InputError

__all__ = ["InputError"]
