"""Benchmark reporting: within each pytest-benchmark group, every implementation's mean
time as a ratio to the group's baseline (``benchmark.extra_info["baseline"] = True``),
printed as a table and written to ``bench/results/latest.json`` (and a timestamped copy),
so runs can be compared across commits. Absolute times on shared machines are noisy; the
ratios within one run are what to read.
"""
import datetime
import json
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
EXTRA = {}  # group -> {name: dict}, filled by record() for non-timing measurements


def record(group, name, **values):
    """Record a non-timing measurement (memory, step counts, agreement) for the report. Each is
    also appended at once to ``bench/results/progress.jsonl`` (and printed): the report is
    written only when the session ends, and a long run that is killed keeps its rows there."""
    EXTRA.setdefault(group, {})[name] = values
    os.makedirs(RESULTS, exist_ok=True)
    line = json.dumps({"when": datetime.datetime.now().isoformat(timespec="seconds"), "group": group,
                       "name": name, **values}, default=str)
    with open(os.path.join(RESULTS, "progress.jsonl"), "a") as f:
        f.write(line + "\n")
    print("\n" + line, flush=True)


import pytest


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    benches = list(getattr(bs, "benchmarks", []) or [])
    if not benches and not EXTRA:
        return
    groups = {}
    for b in benches:
        if not getattr(b, "stats", None):
            continue
        groups.setdefault(b.group or "", []).append(b)
    report = {"when": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "groups": {}, "measurements": EXTRA}
    lines = ["", "ep_kernels benchmarks: mean time and ratio to the group's baseline (higher = faster)"]
    for g, items in sorted(groups.items()):
        base = next((b for b in items if b.extra_info.get("baseline")), None)
        lines.append(f"[{g}]")
        rows = {}
        for b in sorted(items, key=lambda b: -b.stats.mean):
            mean = b.stats.mean
            speedup = (base.stats.mean / mean) if base is not None else None
            rows[b.name] = {"mean_s": mean, "min_s": b.stats.min, "rounds": b.stats.rounds,
                            "speedup_vs_baseline": speedup, **{k: v for k, v in b.extra_info.items()}}
            tag = "  (baseline)" if b is base else ""
            sp = f"{speedup:6.2f}x" if speedup is not None else "   n/a"
            lines.append(f"  {b.name:<60} {mean * 1e3:10.2f} ms  {sp}{tag}")
        report["groups"][g] = rows
    for g, items in sorted(EXTRA.items()):
        lines.append(f"[{g}]")
        for name, vals in items.items():
            lines.append(f"  {name:<40} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in vals.items()))
    for line in lines:
        terminalreporter.write_line(line)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("latest.json", f"bench-{stamp}.json"):
        with open(os.path.join(RESULTS, name), "w") as f:
            json.dump(report, f, indent=1)
