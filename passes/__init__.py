"""qcompile.passes."""
