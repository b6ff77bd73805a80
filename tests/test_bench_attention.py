"""bench/attention.py's table line (the benchmark itself needs a GPU)."""
from __future__ import annotations


def test_decode_line_shows_copy_and_read_fractions(bench_module):
    with bench_module("attention") as mod:
        cell = lambda us, gbs: {"us": us, "GB/s": gbs, "of_copy": gbs / 2000,  # noqa: E731
                                "of_read": gbs / 4000}
        row = {"heads": "8B", "batch": 64, "context": 4096, "int4": cell(150.0, 1900.0),
               "fp16": cell(346.0, 3100.0), "sdpa": cell(242.0, 4400.0), "int4_splits": 2,
               "int4_split1_us": 175.4}
        line = mod._decode_line(row)
        assert "| 1900 (95% / 48%) |" in line and "| 4400 (220% / 110%) |" in line
        assert "int4_split1 175.4" in line and "int4 plan splits 2" in line
        assert line.count("|") == mod.DECODE_HEAD.splitlines()[0].count("|")
        old = dict(row, int4=dict(row["int4"], of_read=None))  # a JSON from before of_read
        assert "| 1900 (95%) |" in mod._decode_line(old)
