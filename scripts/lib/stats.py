"""Small statistics helpers shared by the benchmark scripts (stdlib only)."""


def percentile(sorted_values, p):
    """Nearest-rank percentile (p in 0..100) of an already sorted list."""
    if not sorted_values:
        raise ValueError("no samples")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def summary(samples_ms):
    """Median, p90, p99, mean, min and max of samples in milliseconds."""
    s = sorted(samples_ms)
    return {
        "n": len(s),
        "median": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "mean": sum(s) / len(s),
        "min": s[0],
        "max": s[-1],
    }


def line(name, st):
    return ("%s: n=%d median=%.3f ms p90=%.3f ms p99=%.3f ms mean=%.3f ms min=%.3f max=%.3f"
            % (name, st["n"], st["median"], st["p90"], st["p99"], st["mean"], st["min"], st["max"]))
