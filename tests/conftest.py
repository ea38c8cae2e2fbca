"""Shared test configuration (fixture paths: tests/labfixtures.py)."""
