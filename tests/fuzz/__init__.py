"""Fuzzing for the request-parsing entry point (atheris target, seed corpus, CI smoke)."""
