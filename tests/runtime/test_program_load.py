"""Reading a program caches typing.get_type_hints for torch's serde (a third of the load):
the program read is the same as without the cache, and torch's module is left as it was."""
import contextlib
import typing

from qcompile.runtime import program_archive
from qcompile.runtime.artifact import load_program


def test_cached_type_hints_read_the_same_program(served_artifact, monkeypatch):
    from torch._export.serde import serialize
    cached = load_program(served_artifact)
    assert serialize.typing is typing
    monkeypatch.setattr(program_archive, "_cached_type_hints", contextlib.nullcontext)
    plain = load_program(served_artifact)
    assert cached.graph_module.code == plain.graph_module.code
    assert str(cached.graph_signature) == str(plain.graph_signature)
    assert cached.range_constraints.keys() == plain.range_constraints.keys()
