"""Builders shared by the tests (collections, feature stores, gt datasets, tiny worlds)."""

from pathlib import Path

#: the repository root (conf/, experiments/, the Makefile).
ROOT = Path(__file__).resolve().parents[2]
