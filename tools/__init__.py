"""Tooling for the project's own assets; not installed, run from the repository root."""
