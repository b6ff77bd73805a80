"""qcompile.runtime."""
