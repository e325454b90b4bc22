"""The performance report's verdicts on a results file whose figures are worked out by hand."""

from __future__ import annotations

import json

from benchmarks import report


def bench(test: str, seconds: float, **info) -> dict:
    return {"name": test, "stats": {"min": seconds, "median": seconds, "rounds": 1}, "extra_info": info}


def closed_loop(requests_per_s: float) -> dict:
    return {"requests_per_s": requests_per_s, "p50_ms": 2.0, "p99_ms": 9.0, "server_cpu_ms_per_request": 1.5}


RESULTS = {
    "datetime": "2026-12-01T10:00:00",
    "machine_info": {"cores": 2, "jax": "0.10.2", "jax_devices": ["cpu:0"], "cpu": {"brand_raw": "Test CPU"}},
    "benchmarks": [
        # 1e11 FLOP in 1 s: a 100 GFLOP/s roofline; the surrogate's 2e10 FLOP take 0.2 s at it.
        bench("roofline", 1.0, kind="roofline", name="matmul", flops_per_round=1e11),
        bench("surrogate", 0.5, kind="training", name="mlp surrogate", flops_per_round=2e10, family="mlp"),
        bench("warm", 0.5, kind="experiment", system="heistlab", mode="steady", name="warm"),
        bench("art warm", 1.5, kind="experiment", system="art", mode="steady", name="art warm"),
        bench(
            "fresh",
            2.0,
            kind="experiment",
            system="heistlab",
            mode="fresh",
            name="fresh",
            compile_seconds=0.5,
        ),
        bench("art fresh", 5.0, kind="experiment", system="art", mode="fresh", name="art fresh"),
        bench("none", 0.004, kind="api", defense="none", batch=4096, items_per_round=4096),
        bench("prada", 0.010, kind="api", defense="prada", batch=4096, items_per_round=4096),
        bench("dawn", 0.006, kind="api", defense="dawn", batch=4096, items_per_round=4096),
        bench("distinct none", 0.004, kind="api_distinct", defense="none", batch=4096, items_per_round=4096),
        bench("distinct dawn", 0.016, kind="api_distinct", defense="dawn", batch=4096, items_per_round=4096),
        bench(
            "serving[none]",
            2.0,
            kind="serving",
            defense="none",
            clients=8,
            batch=16,
            requests_per_s=100.0,
            rows_per_s=1600.0,
            p50_ms=50.0,
            p99_ms=200.0,
            server_cpu_ms_per_request=5.0,
        ),
        bench(
            "mlserver",
            1.0,
            heistlab_1=closed_loop(400.0),
            mlserver_1=closed_loop(800.0),
            heistlab_32=closed_loop(1100.0),
            mlserver_32=closed_loop(1000.0),
        ),
    ],
}


def targets(tmp_path) -> dict[str, tuple[str, str]]:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    entries, _ = report.load_entries(path)
    return {target: (measured, verdict) for target, measured, verdict in report.targets_section(entries)}


def test_warm_experiment_is_judged_against_the_surrogates_flop_bound(tmp_path):
    measured, verdict = targets(tmp_path)["knockoff warm in-process <= 2x its FLOP-bound time"]
    assert "0.200 s: 2.5x" in measured  # 0.5 s over 2e10 / 1e11 s
    assert verdict == "**not met**"


def test_fresh_process_needs_twice_arts_speed(tmp_path):
    measured, verdict = targets(tmp_path)["knockoff fresh process >= 2x faster than ART's"]
    assert measured.endswith("2.5x") and verdict == "met"  # 5.0 s / 2.0 s


def test_the_slowest_defense_is_compared_with_none(tmp_path):
    measured, verdict = targets(tmp_path)["every defense at batch 4096 >= half of none's rate"]
    assert measured.startswith("slowest: prada") and "(40%)" in measured  # 4 ms over 10 ms
    assert verdict == "**not met**"


def test_server_target_reads_the_32_client_run(tmp_path):
    target = "server (HTTPS, keys, quota, audit) at 32 clients >= 1x MLServer's requests/s"
    measured, verdict = targets(tmp_path)[target]
    assert measured.endswith("1.10x") and verdict == "met"


def test_markdown_names_the_devices_and_lists_both_client_counts(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    text = report.markdown(path)
    assert "devices cpu:0 (no accelerator in this run)" in text
    server = text.split("### The server beside MLServer")[1].split("###")[0]
    assert "| 1 | 400 |" in server and "0.50x" in server
    assert "| 32 | 1,100 |" in server and "1.10x" in server
    assert "(8 clients, batches of 16 rows" in text and "| none | 100 | 1,600 | 50.0 / 200.0 | 5.00 |" in text


def test_distinct_rows_are_shown_as_shares_of_none(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    section = report.markdown(path).split("### Batches of 4096 distinct rows")[1].split("###")[0]
    assert "| none | 1,024,000 | 100% |" in section and "| dawn | 256,000 | 25% |" in section


def test_defenses_taken_in_turn_decide_the_half_of_none_target(tmp_path):
    side_by_side = bench(
        "side by side",
        0.03,
        kind="api_side_by_side",
        batch=4096,
        items_per_round=4096,
        median_seconds={"none": 0.004, "prada": 0.016, "dawn": 0.005},
    )
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**RESULTS, "benchmarks": [*RESULTS["benchmarks"], side_by_side]}))
    entries, _ = report.load_entries(path)
    found = {target: (measured, verdict) for target, measured, verdict in report.targets_section(entries)}
    measured, verdict = found["every defense at batch 4096 >= half of none's rate"]
    assert measured.startswith("slowest: prada at 25% of none") and verdict == "**not met**"  # 4 ms / 16 ms
    section = report.markdown(path).split("### Every defense beside none at batch 4096")[1].split("###")[0]
    assert "| none | 1,024,000 | 100% |" in section and "| dawn | 819,200 | 80% |" in section
    assert section.index("| dawn |") < section.index("| prada | 256,000 | 25% |")
