"""Evaluation: perplexity / bits per byte (``perplexity``), synthetic tasks (``tasks``), harness.

Import-light on purpose: submodules are imported by the command that needs them.
"""
