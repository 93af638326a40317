"""Offline long-context evaluation: built-in models (`models`), task generators (`tasks`)."""
