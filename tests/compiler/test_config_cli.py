"""CompileConfig and the qcompile CLI generated from it."""
import dataclasses

import pytest

from qcompile.compiler.cli import build_parser, main
from qcompile.compiler.config import PRECISIONS, CompileConfig


def test_cli_flags_mirror_config_fields():
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(CompileConfig):
        assert f.name in flags
    args = parser.parse_args(["m.gguf", "--precision", "w8a8", "--kv", "fp16", "--target", "sm90"])
    cfg = CompileConfig(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(CompileConfig)})
    assert (cfg.precision, cfg.kv, cfg.target) == ("w8a8", "fp16", "sm90")
    assert set(PRECISIONS) >= {"fp16", "w8a8", "w4a8", "w4a8-g128"}


def test_config_round_trips_through_json():
    cfg = CompileConfig(precision="w4a8-g128", kv="int4", dtype="float32")
    assert CompileConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown compile options"):
        CompileConfig.from_json({**cfg.to_json(), "bogus": 1})


def test_kv_rotation_option():
    """On by default, off with --kv-rotation none; manifests older than the option had none."""
    assert build_parser().parse_args(["m.gguf"]).kv_rotation == "hadamard"
    assert build_parser().parse_args(["m.gguf", "--kv-rotation", "none"]).kv_rotation == "none"
    old = {k: v for k, v in CompileConfig().to_json().items() if k != "kv_rotation"}
    assert CompileConfig.from_json(old).kv_rotation == "none"


def test_kv_key_centering_option():
    """On by default for --kv int4 (a no-op for fp16 KV), off with --kv-key-centering none;
    manifests older than the option had none; the pipeline refuses to center without means."""
    from qcompile.compiler.pipeline import build_pipeline
    assert build_parser().parse_args(["m.gguf"]).kv_key_centering == "mean"
    args = build_parser().parse_args(["m.gguf", "--kv-key-centering", "none"])
    assert args.kv_key_centering == "none"
    assert CompileConfig(kv="int4").centers_keys and not CompileConfig(kv="fp16").centers_keys
    assert not CompileConfig(kv="int4", kv_key_centering="none").centers_keys
    old = {k: v for k, v in CompileConfig().to_json().items() if k != "kv_key_centering"}
    assert CompileConfig.from_json(old).kv_key_centering == "none"
    with pytest.raises(ValueError, match="key_mean"):
        build_pipeline(CompileConfig(kv="int4"))


@pytest.mark.parametrize("bad,match", [
    (dict(precision="w3a8"), "--precision must be one of"),
    (dict(target="sm75"), "--target must be one of"),
    (dict(kv="int8"), "--kv must be one of"),
    (dict(kv_block_size=12), "power of two"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        CompileConfig(**bad)


def test_cli_reports_missing_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "nope.gguf" in err and not (tmp_path / "out").exists()


def test_cli_rejects_invalid_choice(capsys):
    with pytest.raises(SystemExit):
        main(["x.gguf", "--target", "sm75"])
    assert "invalid choice" in capsys.readouterr().err
