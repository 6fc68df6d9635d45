"""Prints `dcpp bench --json` rows as the Markdown table docs/benchmarks.md shows.

    dcpp bench --json > rows.json && python bench/table.py rows.json
"""
import json
import sys

# Figures shown per row kind, in this order (GB/s unless the name says otherwise).
COLUMNS = [
    ("dcpp", ("dcpp_first_GBps", "dcpp_GBps")),
    ("dcpp CPU s", ("dcpp_first_cpu_s", "dcpp_cpu_s")),
    ("dcpp later save", ("dcpp_later_GBps",)),
    ("PyTorch DCP", ("dcp_GBps",)),
    ("torch.save / load", ("torch_save_GBps", "torch_load_GBps")),
    ("fio (same jobs)", ("fio_write_GBps", "fio_read_GBps")),
    ("peak RSS MiB (before the load; state)", ("peak_rss_MiB",)),
]


def cell(figures, keys):
    for k in keys:
        if k in figures:
            v = figures[k]
            if k == "peak_rss_MiB" and "rss_before_load_MiB" in figures:
                return (f"{v:.0f} ({figures['rss_before_load_MiB']:.0f}; "
                        f"{figures['state_MiB']:.0f})")
            if k == "peak_rss_MiB" and "state_MiB" in figures:
                return f"{v:.0f} (-; {figures['state_MiB']:.0f})"
            return f"{v:.2f}" if isinstance(v, float) else str(v)
    return ""


def main():
    rows = json.load(open(sys.argv[1]))
    io = [r for r in rows if r["case"].split("/")[0] in ("save", "load", "load-cold")]
    print("| case | " + " | ".join(c for c, _ in COLUMNS) + " | pass |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for r in io:
        f = r["figures"]
        cells = [cell(f, keys) for _, keys in COLUMNS]
        if "bytes_read_per_needed" in f:
            cells[-1] += f"; read/needed {f['bytes_read_per_needed']:.3f}"
        print(f"| {r['case']} | " + " | ".join(cells) + f" | {r['pass']} |")
    print()
    print("| other rows | figures | target | pass |")
    print("|---|---|---|---|")
    for r in rows:
        if r in io:
            continue
        figs = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in r["figures"].items())
        print(f"| {r['case']} | {figs} | {r['target']} | {r['pass']} |")


if __name__ == "__main__":
    main()
