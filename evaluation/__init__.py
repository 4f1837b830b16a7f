"""Evaluation wrappers for tensorft adapters (run from the repository root: ``python -m evaluation.<tool>``)."""
