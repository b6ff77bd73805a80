"""A tiny checkpoint compiled end to end: the artifact's contents, atomic writes, and every
way loading it must fail clearly."""
import dataclasses
import json
import shutil
import zipfile

import pytest
import torch

from qcompile.compiler.artifact import MANIFEST, PROGRAM, WEIGHTS
from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.artifact import ArtifactError, check_target, load_program
from qcompile.runtime.engine import ContextLengthError, Engine

CFG = CompileConfig(precision="w4a8", kv="int4", dtype="float32", kernels="skip",
                    quantizer="rtn")


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact(CFG)


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_manifest_lists_every_file_with_its_hash(artifact):
    m = json.loads((artifact / MANIFEST).read_text())
    assert m["compile"] == CFG.to_json() and m["format_version"] == 1
    assert {WEIGHTS, PROGRAM, "kernels/sm80/kernels.json"} <= set(m["files"])
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert [p["name"] for p in m["passes"]] == ["canonicalize", "rewrite_attention",
                                              "center_keys", "rotate_kv", "swap_gemm",
                                              "fuse_rmsnorm_quant", "fuse_swiglu_quant"]
    assert [p["matches"] for p in m["passes"][2:5]] == [2, 2, 9]  # 8 linears, the W8A8 head
    # the key means and rotation travel as weights
    assert {"kv_key_mean", "kv_rotation"} <= set(m["program"]["weights"])
    assert m["kv"]["key_centering"] is True


def test_program_holds_graph_only(artifact):
    with zipfile.ZipFile(artifact / PROGRAM) as z:
        assert sum(i.file_size for i in z.infolist() if "/data/" in i.filename) < 100
    assert len(load_program(artifact).graph_signature.user_inputs) > 7  # weights are inputs


def test_generate_and_stream_agree(artifact):
    engine = Engine.load(artifact)
    prompts = ["the quick brown fox", "import os"]
    done = engine.generate(prompts, max_new_tokens=6)
    streamed = {0: [], 1: []}
    for ev in engine.stream(prompts, max_new_tokens=6):
        streamed[ev.index].append(ev.token_id)
    assert [c.token_ids for c in done] == [streamed[0], streamed[1]]
    assert all(len(c.token_ids) <= 6 and c.finish_reason in ("eos", "length") for c in done)
    assert engine.cache.free_blocks == engine.cache.num_blocks  # nothing leaked


def test_atomic_write_leaves_nothing_on_failure(artifact, make_tiny_checkpoint, tmp_path,
                                                monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)  # a previous artifact, which a compile may replace
    before = (out / MANIFEST).read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.export, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        compile_model(make_tiny_checkpoint("llama"), CFG, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dir left behind
    assert (out / MANIFEST).read_bytes() == before


def test_artifact_older_than_kv_options_loads(make_tiny_checkpoint, tmp_path):
    """A manifest written before the kv_rotation and kv_key_centering options (no such keys,
    no rotation or key means in the program) reads as both none and serves as it did."""
    cfg = dataclasses.replace(CFG, kv_rotation="none", kv_key_centering="none")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    want = Engine.load(art).generate(["import os"], max_new_tokens=6)[0].token_ids
    m = json.loads((art / MANIFEST).read_text())
    assert not {"kv_rotation", "kv_key_mean"} & set(m["program"]["weights"])
    del m["compile"]["kv_rotation"], m["compile"]["kv_key_centering"], m["kv"]["key_centering"]
    (art / MANIFEST).write_text(json.dumps(m))
    engine = Engine.load(art)
    assert engine.artifact.compile == cfg
    assert engine.generate(["import os"], max_new_tokens=6)[0].token_ids == want


def test_artifact_older_than_lm_head_and_fmpq_loads(artifact, tmp_path):
    """A manifest of before `--lm-head` (a bool `quantize_lm_head`) and
    `--fmpq-int8-fraction` loads with the same meaning; a mistyped old key is refused."""
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    m = json.loads((old / MANIFEST).read_text())
    del m["compile"]["lm_head"], m["compile"]["fmpq_int8_fraction"]
    m["compile"]["quantize_lm_head"] = False
    (old / MANIFEST).write_text(json.dumps(m))
    engine = Engine.load(old)
    assert engine.artifact.compile.lm_head == "float"
    assert engine.generate(["import os"], max_new_tokens=2)[0].token_ids
    m["compile"]["quantize_lm_head"] = "yes"
    (old / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="quantize_lm_head"):
        Engine.load(old)


def _edit_manifest(path, **changes):
    m = json.loads((path / MANIFEST).read_text())
    m.update(changes)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / MANIFEST).write_text("{not json"), "corrupt"),
    (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
    (lambda p: _edit_manifest(p, format_version=99), "format version 99"),
    (lambda p: (p / WEIGHTS).unlink(), "weights.safetensors is missing"),
    (lambda p: open(p / WEIGHTS, "r+b").truncate(1000), "truncated"),
    (lambda p: _flip_byte(p / WEIGHTS), "sha256"),
])
def test_damaged_artifact_is_refused(copy, damage, message):
    damage(copy)
    with pytest.raises(ArtifactError, match=message):
        Engine.load(copy)


def _flip_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_missing_artifact_dir(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        Engine.load(tmp_path / "nothing")


def test_program_with_pickled_payload_is_refused(copy):
    with zipfile.ZipFile(copy / PROGRAM, "a") as z:
        z.writestr("program/data/weights/evil.pt", b"\x80\x04pickle")
    with pytest.raises(ArtifactError, match="program/data/weights/evil.pt', which qcompile "
                                            "never writes"):
        load_program(copy)


def test_artifact_for_another_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100")
    with pytest.raises(ArtifactError,
                       match="built for sm80 but this GPU is NVIDIA H100.*--target sm90"):
        check_target("sm80", torch.device("cuda"))
    check_target("sm90", torch.device("cuda"))
    check_target("sm80", torch.device("cpu"))  # the reference path serves any target


@pytest.fixture(scope="module")
def refusing_engine(artifact):
    """One engine for the requests it must refuse (each load reads the program: ~0.7 s on 2
    cores); a refused request leaves nothing behind, which each test checks."""
    return Engine.load(artifact)


def _untouched(engine) -> bool:
    return not engine.scheduler.has_work() and \
        engine.cache.free_blocks == engine.cache.num_blocks


def test_prompt_longer_than_context(refusing_engine):
    with pytest.raises(ContextLengthError, match="at most 256 tokens"):
        refusing_engine.generate([list(range(3, 259))])
    assert _untouched(refusing_engine)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0)])
def test_invalid_sampling_parameters(refusing_engine, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        refusing_engine.generate(["hello"], **bad)
    assert _untouched(refusing_engine)


def test_kv_cache_too_small(artifact):
    with pytest.raises(ArtifactError, match="less than one full sequence"):
        Engine.load(artifact, kv_cache_bytes=1 << 12)
