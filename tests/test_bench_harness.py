"""The speed harness's framework-free parts (bench/speed.py, bench/peers/variants.py): option
checks, the headline / reference variants and the README table. Nothing here is timed."""

from __future__ import annotations

import os

import pytest

from bench.peers.variants import HEADLINE, reference_variant
from bench.speed import markdown_table, parse_args


def test_pin_takes_available_cpu_ids_and_names_bad_ones(capsys):
    cpu = min(os.sched_getaffinity(0))
    assert parse_args(["--pin", str(cpu), "--check-only"]).pin == [cpu]
    assert parse_args(["--check-only"]).pin is None
    for bad, says in (("x", "comma-separated CPU ids"), ("100000", "not all available")):
        with pytest.raises(SystemExit):
            parse_args(["--pin", bad, "--check-only"])
        err = capsys.readouterr().err
        assert "--pin" in err and says in err


def test_headline_is_compiled_except_for_conv4_and_reference_is_the_uncompiled_call():
    assert HEADLINE == {"mlp": "compiled", "bert": "compiled", "conv4": "eager"}
    assert reference_variant(["metafn", "metafn-eager", "metafn-streams2"]) == "metafn-eager"
    assert reference_variant(["metafn", "metafn-compiled"]) == "metafn"


def _runner(ms: float, ratio: float, **extra) -> dict:
    return {"median_ms": ms, "ratio_vs_metafn": ratio, **extra}


def test_markdown_table_rows_ratios_and_roofline():
    report = {"workloads": {
        "W1": {"runners": {
            "metafn": _runner(3.614, 1.0, gemm_fraction_cpu=0.106,
                              memory={"peak_rss_delta_mb": 7.4}),
            "metafn-eager": _runner(6.4, 1.77),
            "jax": _runner(1.47, 0.407, memory={"peak_rss_delta_mb": 240.4}),
            "torch": _runner(10.45, 2.894),
        }},
        "W4": {"runners": {
            "metafn": _runner(1061.1, 1.0), "metafn-compiled": _runner(1052.0, 0.99),
            "jax": _runner(16375.0, 15.43), "torch": _runner(2492.0, 2.35),
        }},
        "W9": {"runners": {"metafn": {}}},  # built but not timed (--check-only): no row
    }}
    lines = markdown_table(report).splitlines()
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2] == ("| W1 | 3.61 | 6.40 eager | 1.47 | 10.4 | **0.41** | 2.89 | 10.6% "
                        "| 7 / 240 / - |")
    assert lines[3] == ("| W4 | 1061 | 1052 compiled | 16375 | 2492 | 15.43 | 2.35 | - "
                        "| - / - / - |")


def test_table_option_needs_one_results_file(capsys):
    from bench.speed import main

    with pytest.raises(SystemExit, match="--table: expected one results file"):
        main(["--table"])
