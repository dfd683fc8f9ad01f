"""Test and diagnostic instruments (no training code depends on them)."""
