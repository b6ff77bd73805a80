"""An artifact is untrusted input. Hostile program archives of every layout torch has written
(the pre-2.8 `serialized_*.pt` layout, pickled weights / constants / sample inputs in the pt2
layout, payloads in any folder, Python hidden in the program's JSON) never run code; the
manifest's file table cannot be switched off or point outside the artifact; every refusal is
one ArtifactError line. Each "live" control shows torch.export.load itself runs the payload."""
import io
import json
import logging
import shutil

import pytest
import torch
from hostile import OpenSpy, payload, rehash, write_zip, zip_entries

from qcompile.compiler.artifact import MANIFEST, PROGRAM, WEIGHTS
from qcompile.runtime.artifact import ArtifactError, load_program, open_artifact
from qcompile.runtime.cli import run_main
from qcompile.runtime.engine import Engine
from qcompile.runtime.program_archive import check_evaluated_strings, check_graph_ops

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet_torch():
    logging.disable(logging.WARNING)  # torch.export.load logs its fallbacks at length
    yield
    logging.disable(logging.NOTSET)


def _hostile_archives(good: bytes, marker) -> dict[str, list[tuple[str, bytes]]]:
    """name -> archive entries, each hiding `payload(marker)` where some torch reader
    unpickles it (or evaluates it, for the JSON ones)."""
    base = zip_entries(good)
    root = next(iter(base)).split("/")[0]
    mj = base[f"{root}/models/model.json"]
    evil = payload(marker)

    def pt2(**changes):
        e = dict(base)
        e.update({f"{root}/{k}": v for k, v in changes.items()})
        return list(e.items())

    def config(name):
        return json.dumps({"config": {"x": {"path_name": name, "is_param": False,
                                            "use_pickle": True, "tensor_meta": None}}}).encode()
    program = json.loads(mj)
    guards = dict(program, guards_code=[f"open({str(marker)!r}, 'w') is None"])
    expr = mj.decode().replace("Symbol('s", f"(open({str(marker)!r}, 'w') and 0) or Symbol('s", 1)
    return {
        "legacy": [("version", b"8.20"), ("serialized_exported_program.json", mj),
                   ("serialized_state_dict.pt", evil), ("serialized_constants.pt", evil),
                   ("serialized_example_inputs.pt", evil)],
        "legacy_json": [("version", b"8.20"), ("serialized_exported_program.json", mj),
                        ("serialized_state_dict.json", b"{}"),
                        ("serialized_constants.json", b"{}"),
                        ("serialized_example_inputs.pt", evil)],
        "pickled_weight": pt2(**{"data/weights/model_weights_config.json": config("weight_0"),
                                 "data/weights/weight_0": evil}),
        "legacy_weights": pt2(**{"data/weights/model.pt": evil}),
        "legacy_constants": pt2(**{"data/constants/model.pt": evil}),
        "pickled_constant": pt2(**{
            "data/constants/model_constants_config.json": config("tensor_0"),
            "data/constants/tensor_0": evil}),
        "custom_obj": pt2(**{"data/constants/model_constants_config.json":
                             config("custom_obj_0"), "data/constants/custom_obj_0": evil}),
        "sample_inputs": pt2(**{"data/sample_inputs/model.pt": evil}),
        "payload_other_folder": pt2(**{"extra/serialized_constants.pt": evil}),
        "payload_top_level": pt2() + [("serialized_constants.pt", evil)],
        "second_root": pt2() + [("other/data/weights/model.pt", evil)],
        "duplicate_entry": pt2() + [(f"{root}/data/sample_inputs/model.pt", evil)],
        # guards run only where the program has example inputs (plain tensors here)
        "guards_code": pt2(**{"models/model.json": json.dumps(guards).encode(),
                              "data/sample_inputs/model.pt": _tensors_pickle()}),
        "guards_code_only": pt2(**{"models/model.json": json.dumps(guards).encode()}),
        "sympy_expr": pt2(**{"models/model.json": expr.encode()}),
    }


def _tensors_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save(((torch.ones(3, 4),), {}), buf)
    return buf.getvalue()


LIVE = ["legacy", "pickled_weight", "legacy_weights", "legacy_constants", "pickled_constant",
        "sample_inputs", "guards_code", "sympy_expr"]


@pytest.mark.parametrize("name", LIVE)
def test_control_torch_export_load_runs_the_payload(tiny_program, tmp_path, name):
    marker = tmp_path / "marker"
    f = write_zip(tmp_path / "program.pt2", _hostile_archives(tiny_program, marker)[name])
    try:
        torch.export.load(f).module()(torch.ones(3, 4))
    except Exception:  # noqa: BLE001  (the payload runs first; what torch does next varies)
        pass
    assert marker.exists(), f"{name}: torch.export.load no longer runs it; keep the test honest"


HOSTILE = ["legacy", "legacy_json", "pickled_weight", "legacy_weights", "legacy_constants",
           "pickled_constant", "custom_obj", "sample_inputs", "payload_other_folder",
           "payload_top_level", "second_root", "duplicate_entry", "guards_code",
           "guards_code_only", "sympy_expr"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_archive_is_refused_without_running_it(tiny_program, tmp_path, monkeypatch,
                                                       name):
    marker = tmp_path / "marker"
    write_zip(tmp_path / PROGRAM, _hostile_archives(tiny_program, marker)[name])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with OpenSpy() as spy, pytest.raises(ArtifactError) as err:
        load_program(tmp_path)
    assert not marker.exists() and spy.unpickled == []
    assert "\n" not in str(err.value) and str(tmp_path / PROGRAM) in str(err.value)


def test_the_program_qcompile_writes_loads_and_runs(tiny_program, tmp_path):
    (tmp_path / PROGRAM).write_bytes(tiny_program)
    with OpenSpy() as spy:
        ep = load_program(tmp_path)
    assert spy.unpickled == []
    assert torch.equal(ep.module()(torch.ones(5, 4)), torch.full((4,), 15.0))


def test_hostile_program_through_engine_and_qrun(served_artifact, tmp_path, capsys):
    """The issue's attack: a re-hashed legacy archive in a real artifact, loaded by qrun."""
    art = tmp_path / "art"
    shutil.copytree(served_artifact, art)
    marker = tmp_path / "marker"
    good = (art / PROGRAM).read_bytes()
    write_zip(art / PROGRAM, _hostile_archives(good, marker)["legacy"])
    rehash(art, PROGRAM)
    with pytest.raises(ArtifactError, match="never writes"):
        Engine.load(art)
    assert run_main([str(art), "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrun: error:") and "\n" not in err and not marker.exists()


def test_graph_calling_python_or_file_ops_is_refused(tiny_program, tmp_path):
    (tmp_path / PROGRAM).write_bytes(tiny_program)
    ep = load_program(tmp_path)
    node = next(n for n in ep.graph.nodes if n.op == "call_function")
    for target in (torch.ops.aten.from_file.default, print, torch.ops.higher_order.cond):
        original, node.target = node.target, target
        with pytest.raises(ValueError, match="qcompile programs never do"):
            check_graph_ops(ep)
        node.target = original
    check_graph_ops(ep)


# ---- the manifest -------------------------------------------------------------------------

def _edit(art, fn):
    m = json.loads((art / MANIFEST).read_text())
    m = fn(m)
    (art / MANIFEST).write_text(json.dumps(m))


def _set(path, value):
    def fn(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return m
    return fn


def _drop(path):
    def fn(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
        return m
    return fn


MALFORMED = [
    ("list", lambda m: [m], "must hold a JSON object"),
    ("null", lambda m: None, "must hold a JSON object"),
    ("empty file table", _set(["files"], {}), "'files' must be a non-empty"),
    ("files a list", _set(["files"], ["weights.safetensors"]), "'files' must be a non-empty"),
    ("max_seq_len a string", _set(["max_seq_len"], "256"), "'max_seq_len' must be an integer"),
    ("max_seq_len 1", _set(["max_seq_len"], 1), "'max_seq_len' must be an integer from 2"),
    ("huge max_seq_len", _set(["max_seq_len"], 10 ** 30), "'max_seq_len'"),
    ("kv block 0", _set(["kv", "block_size"], 0), "'kv.block_size' must be one of"),
    ("kv format", _set(["kv", "format"], "int3"), "'kv.format' must be one of"),
    ("kv format disagrees", _set(["kv", "format"], "int4"), "'kv.format' is 'int4' but"),
    ("kv layers", _set(["kv", "num_layers"], 7), "'kv.num_layers' is 7"),
    ("string version", _set(["format_version"], "1"), "format version '1', this qcompile"),
    ("model type", _set(["model", "vocab_size"], "256"), "'model.vocab_size' must be a int"),
    ("unknown compile key", _set(["compile", "evil"], 1), "'compile.evil' is not a field"),
    ("bad enum", _set(["compile", "precision"], "w1a1"), "'compile' is invalid"),
    ("target", _set(["target"], "sm90"), "'target' is 'sm90' but compile.target"),
    ("sha not hex", _set(["files", WEIGHTS, "sha256"], "x" * 64), "sha256' must be 64"),
    ("bytes negative", _set(["files", WEIGHTS, "bytes"], -1), "bytes' must be an integer"),
    ("inputs", _set(["program", "inputs"], ["x"]), "'program.inputs' must be"),
    ("weights twice", _set(["program", "weights"], ["a", "a"]), "names a weight twice"),
] + [(f"no {k}", _drop([k]), f"'{k}' is missing")
     for k in ("files", "compile", "model", "kv", "program", "max_seq_len", "target")] + [
    ("no sha256", _drop(["files", WEIGHTS, "sha256"]), "sha256' is missing"),
    ("no weights entry", _drop(["files", WEIGHTS]), "does not list weights.safetensors"),
]


@pytest.mark.parametrize("name,edit,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_manifest_is_one_line(artifact_copy, name, edit, message):
    _edit(artifact_copy, edit)
    with pytest.raises(ArtifactError) as err:
        open_artifact(artifact_copy, CPU)
    text = str(err.value)
    assert message in text and MANIFEST in text and "\n" not in text


@pytest.mark.parametrize("outside", ["../../../../etc/passwd", "/etc/hostname",
                                     "../secret.txt", "tokenizer/../../secret.txt"])
def test_paths_escaping_the_artifact_are_never_read(artifact_copy, outside):
    secret = artifact_copy.parent / "secret.txt"
    secret.write_text("not yours")
    _edit(artifact_copy, _set(["files", outside],
                              {"sha256": "0" * 64, "bytes": secret.stat().st_size}))
    with OpenSpy() as spy, pytest.raises(ArtifactError, match="must stay inside the artifact"):
        open_artifact(artifact_copy, CPU)
    assert not [p for p in spy.opened if "secret" in p or p.startswith("/etc")]


def test_symlink_out_of_the_artifact_is_refused(artifact_copy):
    secret = artifact_copy.parent / "secret.txt"
    secret.write_text("not yours")
    (artifact_copy / "tokenizer" / "tokenizer.json").unlink()
    (artifact_copy / "tokenizer" / "tokenizer.json").symlink_to(secret)
    rehash(artifact_copy, "tokenizer/tokenizer.json")  # hashes the target: the attacker's view
    with OpenSpy() as spy, pytest.raises(ArtifactError, match="symbolic link"):
        open_artifact(artifact_copy, CPU)
    assert not [p for p in spy.opened if "secret" in p or "tokenizer.json" in p]


def test_unlisted_file_is_refused(artifact_copy):
    (artifact_copy / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(ArtifactError, match="added_tokens.json is not listed"):
        open_artifact(artifact_copy, CPU)


def test_deleted_tokenizer_is_refused_not_looked_up_on_the_hub(artifact_copy):
    shutil.rmtree(artifact_copy / "tokenizer")
    _edit(artifact_copy, lambda m: {**m, "files": {k: v for k, v in m["files"].items()
                                                   if not k.startswith("tokenizer/")}})
    with pytest.raises(ArtifactError, match="lists no tokenizer/ file"):
        Engine.load(artifact_copy)


@pytest.mark.parametrize("header", [b"\xff" * 8, (10 ** 9).to_bytes(8, "little") + b"{",
                                    (20).to_bytes(8, "little") + b'{"w": {"dtype": 1}}  '])
def test_hostile_safetensors_rehashed_is_one_line(artifact_copy, header):
    (artifact_copy / WEIGHTS).write_bytes(header)
    rehash(artifact_copy, WEIGHTS)
    with pytest.raises(ArtifactError, match="not a valid safetensors file") as err:
        Engine.load(artifact_copy)
    assert "\n" not in str(err.value)


def test_prompt_that_is_not_utf8(served_artifact):
    engine = Engine.load(served_artifact)
    with pytest.raises(ValueError, match="not valid UTF-8") as err:
        engine.generate(["caf\udcff"], max_new_tokens=2)  # qrun -p $'caf\xff'
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="token ids must be integers from 0 to 255"):
        engine.generate([[1, 2, 999]], max_new_tokens=2)


def test_schema_knows_every_config_field_type():
    """A new config field of a new type must get a check in runtime/manifest.py."""
    import dataclasses

    from qcompile.compiler.config import CompileConfig
    from qcompile.models.config import ModelConfig
    from qcompile.runtime.manifest import _FIELD_TYPES
    types = {f.type for cls in (CompileConfig, ModelConfig) for f in dataclasses.fields(cls)}
    assert types <= set(_FIELD_TYPES)


@pytest.mark.parametrize("expr", [
    "Add(Mul(Integer(2), Symbol('s52', positive=True, integer=True)), Integer(1))",
    "Max(Integer(2), Symbol('s1', integer=True))", "Symbol('u0', integer=True)",
    "floor(Mul(Rational(1, 2), Symbol('s1', positive=True, integer=True)))"])
def test_sympy_expressions_torch_writes_pass(expr):
    check_evaluated_strings({"graph": [{"expr_str": expr}], "guards_code": [
        "L['query_start'].size()[0] == (1 + L['block_tables'].size()[0])"]})


@pytest.mark.parametrize("field,text", [
    ("expr_str", "__import__('os').system('true')"),
    ("expr_str", "Symbol('s1').__class__"),
    ("expr_str", "Integer(2)**Integer(10)**Integer(10)"),
    ("expr_str", "Integer(" + "9" * 30 + ")"),
    ("expr_str", "Symbol('x; import os')"),
    ("expr_str", "eval('1')"),
    ("guards_code", "L['x'].size()[0] == len(open('/etc/passwd').read())"),
    ("guards_code", "L['x'].__class__"),
    ("guards_code", "2 ** 2 ** 99 > L['x'].size()[0]"),
])
def test_strings_torch_would_eval_are_refused(field, text):
    doc = {"guards_code": [text]} if field == "guards_code" else {"a": [{"expr_str": text}]}
    with pytest.raises(ValueError, match="qcompile does not write"):
        check_evaluated_strings(doc)
