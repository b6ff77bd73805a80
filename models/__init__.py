"""qcompile.models."""
