"""qcompile.cutlass_templates."""
