"""benchmarks/bench_ab.py's report: medians over rounds, the A/B ratio, and
the refusals that keep an A/B honest (two labels from two packages)."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_ab.py")
_spec = importlib.util.spec_from_file_location("bench_ab", _PATH)
bench_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ab)


def _row(label, package, bwd_ms, cudnn_ms, hd=128, causal=False, s=4096):
    return {"label": label, "package": package, "dtype": "bf16", "hd": hd, "causal": causal, "s": s, "batch": 4,
            "heads": 16, "flops_fwd": 4.0 * 4 * 16 * s * s * hd / (2 if causal else 1), "ours_bwd_ms": bwd_ms,
            "cudnn_bwd_ms": cudnn_ms}


def _write(tmp_path, rows):
    path = tmp_path / "ab.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_report_medians_and_ratio(tmp_path):
    # Three rounds: A's median 2.0 ms, B's 1.6 ms, so A/B = 1.25; per round 2.0/1.6, 2.2/1.7, 1.9/1.5.
    rows = []
    for a_ms, b_ms in ((2.0, 1.6), (2.2, 1.7), (1.9, 1.5)):
        rows += [_row("A", "/a/flash_attn_ext/__init__.py", a_ms, 1.8), _row("B", "/b/flash_attn_ext/__init__.py", b_ms, 1.8)]
    text = bench_ab.report(_write(tmp_path, rows), None, None)
    line = next(x for x in text.splitlines() if x.startswith("| bwd |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["bf16", "128", "no", "4096"]
    flops = 4.0 * 4 * 16 * 4096 * 4096 * 128 * 2.5
    assert float(cells[5]) == pytest.approx(flops / 2.0e-3 / 1e12, abs=0.5)  # A's TFLOP/s at its median
    assert float(cells[6]) == pytest.approx(flops / 1.6e-3 / 1e12, abs=0.5)
    assert cells[8].startswith("1.250 (")
    lo, hi = (float(x) for x in cells[8].split("(")[1].rstrip(")").split("-"))
    assert lo == pytest.approx(min(2.0 / 1.6, 2.2 / 1.7, 1.9 / 1.5), abs=1e-3)
    assert hi == pytest.approx(max(2.0 / 1.6, 2.2 / 1.7, 1.9 / 1.5), abs=1e-3)
    assert float(cells[9]) == pytest.approx(1.8 / 2.0, abs=0.01) and float(cells[10]) == pytest.approx(1.8 / 1.6, abs=0.01)
    assert "geometric mean of A/B 1.250 over 1 shapes, 3 rounds" in text


def test_report_labels_can_be_swapped(tmp_path):
    rows = [_row("base", "/a/x.py", 2.0, 1.0), _row("new", "/b/x.py", 1.0, 1.0)]
    text = bench_ab.report(_write(tmp_path, rows), "new", "base")
    assert "A = new, B = base" in text and "geometric mean of A/B 0.500" in text


def test_report_refuses_one_package_for_both(tmp_path):
    rows = [_row("A", "/same/x.py", 2.0, 1.0), _row("B", "/same/x.py", 1.0, 1.0)]
    with pytest.raises(SystemExit, match="same package"):
        bench_ab.report(_write(tmp_path, rows), None, None)


def test_report_refuses_a_label_from_two_packages(tmp_path):
    rows = [_row("A", "/a/x.py", 2.0, 1.0), _row("A", "/c/x.py", 2.0, 1.0), _row("B", "/b/x.py", 1.0, 1.0)]
    with pytest.raises(SystemExit, match="two packages"):
        bench_ab.report(_write(tmp_path, rows), None, None)


def test_report_needs_two_labels(tmp_path):
    with pytest.raises(SystemExit, match="two labels"):
        bench_ab.report(_write(tmp_path, [_row("A", "/a/x.py", 2.0, 1.0)]), None, None)


def test_time_arguments():
    args = bench_ab.parse_args(["time", "B", "--dirs", "fwd,bwd", "--seqlens", "1k,512", "--causal", "yes"])
    assert args.dirs == ["fwd", "bwd"] and args.seqlens == [1024, 512] and args.causal == [True]
    for bad in (["--dirs", "sideways"], ["--seqlens", "4q"], ["--hdims", "0"], ["--seqlens", ","]):
        with pytest.raises(SystemExit):
            bench_ab.parse_args(["time", "B", *bad])
