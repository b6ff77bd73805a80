"""A truncated or foreign .gguf is one ValueError line saying so, found before transformers
reads the file (which fails with numpy's "cannot reshape array ..." or a struct.error)."""
import pytest

from qcompile.models.loaders import load_checkpoint


@pytest.mark.parametrize("keep", [3, 5000, 2_000_000, -432])
def test_truncated_gguf(smollm2_gguf, tmp_path, keep):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "model.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="the file is truncated") as err:
        load_checkpoint(cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_checkpoint(f)
