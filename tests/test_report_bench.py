"""The report's decode-benchmark section: tables and ratios from the newest bench run only."""

from __future__ import annotations

import pandas as pd

from lessctl.report.bench import bench_sections


def rows(run: str, lat: dict[tuple[str, int], float]) -> list[dict]:
    out = []
    for (method, context), ms in lat.items():
        base = {
            "task": "bench",
            "_run": run,
            "method": method,
            "context": context,
            "batch_size": 1,
            "policy": "full" if method == "full" else "lambda",
            "budget": None if method == "full" else 32,
            "memory_cap_mb": 1024.0,
        }
        vals = {
            "latency_ms": ms,
            "tokens_per_s": 1e3 / ms,
            "cache_bytes": 2**20,
            "peak_mem_bytes": 2**30,
            "prefill_s": 1.0,
            "prefill_peak_mem_bytes": 2**30,
        }
        if method != "full":
            vals |= {"step_policy_us": 30.0, "step_total_us": 100.0}
        out += [{**base, "metric": k, "value": v} for k, v in vals.items()]
        if context == 8192:  # interleaved rounds at each method's equal-memory batch
            fit, ms = (2, [200.0, 200.0]) if method == "full" else (64, [128.0, 128.0])
            out.append(
                {
                    **base,
                    "batch_size": fit,
                    "metric": "equal_memory_tokens_per_s",
                    "value": fit * 1e3 / ms[0],
                    "samples_ms": ms,
                }
            )
    return out


def test_ratios_come_from_the_newest_run(tmp_path):
    old = rows("20260101-000000-000000-x", {("full", 8192): 100.0, ("baseline", 8192): 10.0})
    new = rows(
        "20260102-000000-000000-x",
        {("full", 8192): 200.0, ("baseline", 8192): 50.0, ("less", 8192): 55.0},
    )
    md = "\n".join(bench_sections(pd.DataFrame(old + new), tmp_path))
    assert "20260102-000000-000000-x" in md and "20260101" not in md
    assert "| 8192 | 1 | 1.100 | 0.250 | 0.275 |" in md  # less/baseline, baseline/full, less/full
    assert "| less | 8192 | 64 | 500.000 | 2 |" in md  # equal memory
    assert "| 8192 | less / full | 50.000 | [50.000, 50.000] |" in md  # (64/128) / (2/200)
    assert "| baseline | 8192 | 30.000 | 100.000 |" in md  # step phases
    assert (tmp_path / "bench-latency_ms.png").exists()


def test_no_bench_rows_no_section(tmp_path):
    assert bench_sections(pd.DataFrame([{"task": "perplexity", "metric": "x"}]), tmp_path) == []


def test_interleaved_ratios_with_intervals(tmp_path):
    run = "20260102-000000-000000-x"
    base = rows(run, {("baseline", 1024): 50.0, ("less", 1024): 55.0})
    den = [40.0, 60.0, 50.0]
    paired = [
        {**base[0], "method": m, "metric": "paired_ms", "value": sum(ms) / 3, "samples_ms": ms}
        for m, ms in (("baseline", den), ("less", [1.2 * x for x in den]))
    ]
    md = "\n".join(bench_sections(pd.DataFrame(base + paired), tmp_path))
    assert "| 1024 | less / baseline | 1.200 | [1.200, 1.200] | 3 |" in md
    assert "Prefill only" not in md  # the interleaved rows are not prefill-only rows


def test_bench_rows_alone_make_no_method_table():
    """A results folder with bench runs alone: the perplexity tables are empty, not an error."""
    from lessctl.report import method_table

    d = pd.DataFrame(rows("20260102-000000-000000-x", {("less", 1024): 5.0}))
    assert method_table(d, "ppl_word", lower_is_better=True).empty
