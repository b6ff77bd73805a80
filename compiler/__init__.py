"""qcompile.compiler."""
