"""Held-out text sources (issue 14): what perplexity is scored on and what QoQ calibrates on
are different texts, each read from what is installed (no download), reported by name when a
machine lacks one."""
import pytest

from qcompile.runtime import texts


def test_calibration_and_evaluation_sources_are_apart():
    assert not set(texts.CALIB_SOURCES) & set(texts.EVAL_SOURCES)
    assert set(texts.CALIB_SOURCES) | set(texts.EVAL_SOURCES) <= set(texts.SOURCES)


@pytest.mark.parametrize("name", list(texts.SOURCES))
def test_every_source_reads_as_prose(name):
    try:
        text = texts.read_source(name)
    except texts.SourceMissing as e:
        pytest.skip(str(e))
    assert len(text) > 50_000, (name, len(text))
    assert "\x00" not in text
    if name == "cpython-prose":
        assert "<" not in text[:2000]  # the help page's tags are stripped


def test_sources_do_not_share_long_passages():
    """No 200-character passage of a calibration source appears in an evaluation source."""
    cal = texts.read_source("stdlib-docstrings")
    for name in texts.EVAL_SOURCES:
        try:
            ev = texts.read_source(name)
        except texts.SourceMissing:
            continue
        probes = [cal[i:i + 200] for i in range(0, len(cal) - 200, len(cal) // 50)]
        assert not any(p in ev for p in probes), name


def test_unknown_source_names_the_known_ones():
    with pytest.raises(KeyError, match="pydoc"):
        texts.read_source("wikitext")


def test_calibration_sequences_from_a_source(tiny_tokenizer):
    from qcompile.compiler.calibrate import calibration_sequences
    doc = calibration_sequences(tiny_tokenizer, 2, 64, source="stdlib-docstrings")
    pydoc = calibration_sequences(tiny_tokenizer, 2, 64)
    assert [len(s) for s in doc] == [64, 64] and doc != pydoc


def test_calib_source_is_checked():
    from qcompile.compiler.config import CALIB_CHOICES, CompileConfig
    assert CompileConfig().calib_source in CALIB_CHOICES
    with pytest.raises(ValueError, match="calib-source"):
        CompileConfig(calib_source="package-readmes")  # an evaluation source
