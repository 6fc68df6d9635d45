"""Plots `dcpp bench --json` rows: dcpp against the PyTorch peers and the machine's limits.

    dcpp bench --json > rows.json && python bench/plot.py rows.json docs/benchmarks.png
(matplotlib from the venv: scripts/requirements.txt).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    rows = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    series = {  # legend -> figure key per row kind
        "dcpp (first save / load)": ("dcpp_first_GBps", "dcpp_GBps"),
        "dcpp (later save)": ("dcpp_later_GBps", None),
        "PyTorch DCP": ("dcp_GBps", "dcp_GBps"),
        "torch.save / torch.load": ("torch_save_GBps", "torch_load_GBps"),
        "fio (same jobs)": ("fio_write_GBps", "fio_read_GBps"),
    }
    cases = [r for r in rows if r["case"].startswith(("save/large", "save/small", "load/large",
                                                      "load/small", "load-cold/large"))]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(series)
    for i, (label, (save_key, load_key)) in enumerate(series.items()):
        ys = []
        for r in cases:
            key = save_key if r["case"].startswith("save") else load_key
            ys.append(r["figures"].get(key, 0) if key else 0)
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels([r["case"].replace("/t", "\n") + " thr" for r in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s (log)")
    ax.set_title("dcpp bench: save (fsync), load (page cache) and cold load, medians of rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
