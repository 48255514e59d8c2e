"""Helpers shared by several test folders (tests/README.md lists them)."""
