"""Compile inputs that used to fail late or not at all: KV page sizes outside 8..256, a
--max-seq-len that fits no prompt, one beyond the model's context, a missing --calib-text."""
import warnings

import pytest

import qcompile.compiler.compile as compile_mod
from qcompile.compiler.config import CompileConfig
from qcompile.models.loaders import load_checkpoint


@pytest.mark.parametrize("size", [0, -16, 4, 12, 512, 1 << 30])
def test_kv_block_size_out_of_range(size):
    with pytest.raises(ValueError, match="--kv-block-size must be a power of two from 8 to 256"):
        CompileConfig(kv_block_size=size)


@pytest.mark.parametrize("size", [8, 16, 256])
def test_kv_block_size_in_range(size):
    assert CompileConfig(kv_block_size=size).kv_block_size == size


@pytest.mark.parametrize("n", [1, -1, 1 << 25])
def test_max_seq_len_out_of_range(n):
    with pytest.raises(ValueError, match=r"--max-seq-len must be 0 .* from 2 \(one prompt token"):
        CompileConfig(max_seq_len=n)


def test_max_seq_len_two_and_zero_are_accepted():
    assert CompileConfig(max_seq_len=2).max_seq_len == 2
    assert CompileConfig(max_seq_len=0).max_seq_len == 0


def test_missing_calib_text_is_found_before_loading(tmp_path, monkeypatch):
    def load(*a, **k):
        raise AssertionError("loaded the checkpoint before checking --calib-text")
    monkeypatch.setattr(compile_mod, "load_checkpoint", load)
    cfg = CompileConfig(quantizer="qoq", calib_text=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="--calib-text .*missing.txt: no such file"):
        compile_mod.compile_model(tmp_path / "model", cfg, tmp_path / "out", progress=False)


class _Stop(Exception):
    pass


def test_max_seq_len_beyond_trained_context_warns(make_tiny_checkpoint, tmp_path, monkeypatch):
    """The tiny model is trained for 256 positions; the compile stops right after the check."""
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    monkeypatch.setattr(compile_mod, "Decoder", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    cfg = CompileConfig(precision="fp16", kv="fp16", kernels="skip", max_seq_len=1024)
    with pytest.warns(UserWarning, match="--max-seq-len 1024 is beyond the model's trained "
                                         r"context \(256 tokens\)"), pytest.raises(_Stop):
        compile_mod.compile_checkpoint(ckpt, cfg, tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        with pytest.raises(_Stop):
            compile_mod.compile_checkpoint(ckpt, CompileConfig(**{**cfg.to_json(),
                                                                 "max_seq_len": 256}),
                                           tmp_path / "out", progress=False)
