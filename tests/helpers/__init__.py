"""Helpers the test modules share (import them as `from helpers.recipes import write_recipe`); fixtures built on
them live in tests/conftest.py."""
