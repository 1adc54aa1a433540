"""Evaluation and results scripts (run as `python eval/NAME.py ...`); a package so the tests import them by name."""
