"""Seeded, bounded fuzzing of the loader: random mutations of a real manifest (types, missing
keys, paths with '..', absolute paths, symbolic links out of the directory, huge numbers) and
of program.pt2's members (payloads in torch's entry names and any folder, dropped, duplicated,
compressed or corrupted entries, mutated program JSON). Every case must load or end in one
ArtifactError line: no other exception, no pickle, no torch.load, no file outside the artifact
opened or hashed."""
import copy
import json
import random
import zipfile

import pytest
import torch
from hostile import OpenSpy, payload, write_zip, zip_entries

import qcompile.runtime.artifact as artifact_mod
from qcompile.compiler.artifact import MANIFEST, PROGRAM, sha256_file
from qcompile.runtime.artifact import ArtifactError, load_program, open_artifact

MANIFEST_CASES = 2500
ARCHIVE_CASES = 1500
JUNK = [None, True, False, 0, -1, 1, 2 ** 63, -(2 ** 70), 10 ** 400 // 10 ** 390, 1e308, 0.5,
        float("nan"), "", "x" * 5000, "256", "1", "../../etc/passwd", "/etc/hostname",
        "\udcff", [], {}, [1, "a"], {"a": None}, [[[[]]]]]
HOSTILE_NAMES = ["../../../../etc/passwd", "/etc/hostname", "../secret.txt",
                 "tokenizer/../../secret.txt", "./weights.safetensors", "a//b", "tokenizer/",
                 "", "manifest.json", "nul\0byte", "back\\slash", "x" * 2000, ".."]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _parent(root, path):
    for k in path[:-1]:
        root = root[k]
    return root


def _mutate_json(rng: random.Random, doc):
    """One random edit of a JSON document: drop, replace (junk or a type swap) or add."""
    paths = [p for p, _ in _paths(doc) if p]
    if not paths or rng.random() < 0.03:
        return rng.choice(JUNK)
    path = rng.choice(paths)
    parent, key = _parent(doc, path), path[-1]
    old = parent[key]
    r = rng.random()
    if r < 0.3:
        del parent[key]
    elif r < 0.55 and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([str(old), float(old), -old, old * 10 ** 12, True, [old]])
    elif r < 0.85:
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    elif isinstance(old, dict):
        old[rng.choice(["evil", "format", "files", "sha256", "bytes"])] = rng.choice(JUNK)
    else:
        parent[key] = {"nested": old}
    return doc


def _mutate_files(rng, m, secret):
    """Point the file table outside the artifact, with the secret's true size and hash."""
    if not isinstance(m.get("files"), dict):
        return
    entry = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}
    name = rng.choice(HOSTILE_NAMES + [str(secret)])
    if rng.random() < 0.5 and m["files"]:
        del m["files"][rng.choice(sorted(m["files"]))]
    m["files"][name] = entry


def _link_outside(rng, art, m, secret):
    """A symbolic link inside the artifact to the secret, listed with the secret's hash."""
    link = art / "tokenizer" / rng.choice(["tokenizer.json", "evil.json"])
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    m["files"]["tokenizer/" + link.name] = {"sha256": sha256_file(secret),
                                            "bytes": secret.stat().st_size}
    return link


def _check_refusal(err: ArtifactError):
    assert "\n" not in str(err) and str(err)


def test_manifest_fuzz(artifact_copy, monkeypatch):
    art, rng = artifact_copy, random.Random(11)
    secret = art.parent / "secret.txt"
    secret.write_text("outside the artifact")
    base = json.loads((art / MANIFEST).read_text())
    keep = {p: p.read_bytes() for p in (art / "tokenizer").iterdir()}
    hashed = []
    monkeypatch.setattr(artifact_mod, "sha256_file",
                        lambda p: hashed.append(p.resolve()) or sha256_file(p))
    outcomes, spy = {"loaded": 0, "refused": 0}, OpenSpy()
    for case in range(MANIFEST_CASES):
        m, link = copy.deepcopy(base), None
        for _ in range(rng.choice([1, 1, 2, 3])):
            kind = rng.random()
            if kind < 0.7:
                m = _mutate_json(rng, m)
            elif kind < 0.9 and isinstance(m, dict):
                _mutate_files(rng, m, secret)
            elif isinstance(m, dict) and isinstance(m.get("files"), dict):
                link = _link_outside(rng, art, m, secret)
        (art / MANIFEST).write_text(json.dumps(m))
        try:
            with spy:  # only the loader's own opens
                open_artifact(art, torch.device("cpu"))
            outcomes["loaded"] += 1
        except ArtifactError as e:
            _check_refusal(e)
            outcomes["refused"] += 1
        if link is not None:  # restore the tokenizer folder
            link.unlink()
            for p, data in keep.items():
                if not p.exists():
                    p.write_bytes(data)
    root = art.resolve()
    assert hashed and all(p.is_relative_to(root) for p in hashed)
    assert not [p for p in spy.opened if "secret" in p or p.startswith("/etc")]
    assert spy.opened and spy.unpickled == []
    assert outcomes["refused"] > MANIFEST_CASES // 2 and outcomes["loaded"] > 0, outcomes


def _mutate_archive(rng, entries: list, root: str, evil: bytes, tmp_path):
    """One random edit of program.pt2's members; returns the archive's bytes."""
    names = ["serialized_exported_program.json", "serialized_constants.pt",
             "serialized_state_dict.pt", "serialized_example_inputs.pt", "version",
             "data/weights/weight_0", "data/weights/model.pt", "data/constants/model.pt",
             "data/constants/tensor_0", "data/constants/custom_obj_0",
             "data/sample_inputs/model.pt", "extra/x.pt", "models/other.json",
             "data/aotinductor/model/x.so", "archive_format"]
    r = rng.random()
    if r < 0.25:
        folder = rng.choice(["", f"{root}/", "other/", f"{root}/extra/", f"{root}/data/"])
        entries.append((folder + rng.choice(names), rng.choice([evil, b"", b"{}", b"0"])))
    elif r < 0.35 and entries:
        entries.pop(rng.randrange(len(entries)))
    elif r < 0.45 and entries:
        entries.append(rng.choice(entries))
    elif r < 0.6 and entries:
        i = rng.randrange(len(entries))
        entries[i] = (entries[i][0], rng.choice([evil, b"", b"{}", b"pt3", rng.randbytes(20),
                                                 b'{"config": {"a": 1}}']))
    elif r < 0.85:
        for i, (name, data) in enumerate(entries):
            if name.endswith("models/model.json") and data.startswith(b"{"):
                doc = _mutate_json(rng, json.loads(data))
                entries[i] = (name, json.dumps(doc).encode())
                break
    data = _zip_bytes(entries, tmp_path, compress=rng.random() < 0.05)
    if rng.random() < 0.1:  # damage the container itself
        data = bytearray(data)
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    return data


def _zip_bytes(entries, tmp_path, compress: bool) -> bytes:
    f = tmp_path / "scratch.zip"
    if compress:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in entries:
                z.writestr(name, data)
    else:
        write_zip(f, entries)
    return f.read_bytes()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_program_archive_fuzz(tiny_program, tmp_path, monkeypatch):
    rng, marker = random.Random(11), tmp_path / "marker"
    base = list(zip_entries(tiny_program).items())
    root = base[0][0].split("/")[0]
    evil = payload(marker)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    outcomes = {"loaded": 0, "refused": 0}
    with OpenSpy() as spy:
        for case in range(ARCHIVE_CASES):
            entries = list(base)
            for _ in range(rng.choice([1, 1, 2])):
                data = _mutate_archive(rng, entries, root, evil, tmp_path)
            (tmp_path / PROGRAM).write_bytes(data)
            try:
                load_program(tmp_path).module()  # as Engine.load does
                outcomes["loaded"] += 1
            except ArtifactError as e:
                _check_refusal(e)
                outcomes["refused"] += 1
            assert not marker.exists(), case
    assert spy.unpickled == []
    assert outcomes["refused"] > ARCHIVE_CASES // 2 and outcomes["loaded"] > 0, outcomes
