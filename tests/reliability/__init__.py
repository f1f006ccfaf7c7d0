"""Fault tests: crash points, the crash matrix and its checker."""
