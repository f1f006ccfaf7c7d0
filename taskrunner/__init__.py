"""taskrun: a git-native, file-driven orchestrator for Agents on Workers."""

__version__ = "0.1.0"
