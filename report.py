"""
Tabulate a bench.sh sweep: results.md, results.csv and a loss-vs-tokens plot per size.

    python report.py results/2026-11-25-cpu
"""
import csv
import glob
import json
import os
import sys

from model import estimate_bf16_bytes

METHODS = ["full", "galore", "fira", "lowrank", "lowrank_refactor"]
LABELS = {"full": "Full-rank AdamW", "galore": "GaLore", "fira": "Fira", "lowrank": "Low-rank",
          "lowrank_refactor": "Low-rank + refactor + reset"}
ESTIMATE = {"full": "full", "galore": "galore", "fira": "fira", "lowrank": "lowrank", "lowrank_refactor": "lowrank"}

# C4 validation perplexity (memory in GB, bf16) as the papers report them. GaLore (Zhao et al. 2024)
# Table 2 counts weights + optimizer states; Fira (Chen et al. 2024) Table 3 adds the gradients, so its
# memory figures are not comparable with GaLore's. Glentis et al. (2025) give their table only as a
# figure we could not read back; their abstract: low-rank + both techniques beats GaLore and Fira at 1b
# with about 25% less memory.
PAPER = {
    "full": ("GaLore Table 2", {"60m": (34.06, 0.36), "130m": (25.08, 0.76), "350m": (18.80, 2.06),
                                "1b": (15.56, 7.80)}),
    "galore": ("GaLore Table 2", {"60m": (34.88, 0.24), "130m": (25.36, 0.52), "350m": (18.95, 1.22),
                                  "1b": (15.64, 4.38)}),
    "fira": ("Fira Table 3 (memory incl. gradients)", {"60m": (31.06, 0.36), "130m": (22.73, 0.77),
                                                       "350m": (16.85, 1.90), "1b": (14.31, 6.98)}),
    "lowrank": ("GaLore Table 2", {"60m": (78.18, 0.26), "130m": (45.51, 0.54), "350m": (37.41, 1.08),
                                   "1b": (142.53, 3.57)}),
}

COLUMNS = ["method", "size", "rank", "status", "tokens", "val_ppl", "val_loss", "weights_states_mib",
           "bf16_estimate_mib", "peak_gpu_mib", "tokens_per_s", "rel_speed"]


def load_runs(out):
    rows = []
    for run in sorted(glob.glob(os.path.join(out, "runs", "*_*"))):
        method, size = os.path.basename(run).rsplit("_", 1)
        row = {"method": method, "size": size}
        if os.path.exists(os.path.join(run, "result.json")):
            r = json.load(open(os.path.join(run, "result.json")))
            row.update(status="ok", rank=r["rank"], tokens=r["tokens"], val_ppl=round(r["val_ppl"], 2),
                       val_loss=round(r["val_loss"], 4),
                       weights_states_mib=round((r["weights_bytes"] + r["optimizer_state_bytes"]) / 2**20, 1),
                       peak_gpu_mib=(round(r["max_memory_allocated_bytes"] / 2**20)
                                     if "max_memory_allocated_bytes" in r else ""),
                       tokens_per_s=round(r["tokens_per_s"] or 0))
        elif os.path.exists(os.path.join(run, "failed.json")):
            row["status"] = "failed: " + json.load(open(os.path.join(run, "failed.json")))["reason"]
        else:
            row["status"] = "incomplete"
        if method in ESTIMATE:
            est = estimate_bf16_bytes(size, ESTIMATE[method])
            row["bf16_estimate_mib"] = round((est["weights_bytes"] + est["optimizer_state_bytes"]) / 2**20, 1)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["size"], order.get(r["method"], len(order))))
    for row in rows:  # throughput relative to full-rank AdamW at the same size
        full = next((f for f in rows if f["method"] == "full" and f["size"] == row["size"]
                     and f.get("tokens_per_s")), None)
        if full and row.get("tokens_per_s"):
            row["rel_speed"] = round(row["tokens_per_s"] / full["tokens_per_s"], 2)
    return rows


def markdown(rows, out):
    lines = ["| method | size | rank | tokens | val ppl | weights + states (MiB, as trained) "
             "| bf16 estimate (MiB) | peak GPU (MiB) | tokens/s | vs full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['size']} | | | {r['status']} "
                         f"| | {r.get('bf16_estimate_mib', '')} | | | |")
            continue
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['size']} | {r['rank'] or 'full'} "
                     f"| {r['tokens']:,} | {r['val_ppl']:.2f} | {r['weights_states_mib']} "
                     f"| {r['bf16_estimate_mib']} | {r['peak_gpu_mib'] or '-'} | {r['tokens_per_s']:,} "
                     f"| {r.get('rel_speed', '-')} |")
    paper = ["", "Reported by the papers (C4, full budgets; ppl (memory GB)) next to this sweep's ppl:", "",
             "| method | size | paper ppl | paper memory (GB) | source | our ppl | our tokens |", "|---|---|---|---|---|---|---|"]
    matched = False
    for r in rows:
        source, table = PAPER.get(r["method"], (None, {}))
        if r["size"] in table:
            matched = True
            ppl, gb = table[r["size"]]
            ours = (f"{r['val_ppl']:.2f} | {r['tokens']:,}") if r["status"] == "ok" else f"{r['status']} |"
            paper.append(f"| {LABELS[r['method']]} | {r['size']} | {ppl} | {gb} | {source} | {ours} |")
    if not matched:
        paper = ["", "No size of this sweep is a paper size (60m, 130m, 350m, 1b), so there is nothing to put "
                 "next to the papers' numbers."]
    notes = ["", "weights + states: bytes counted from the live tensors (fp32 master weights and states). "
             "bf16 estimate: weights + optimizer states at 2 bytes each, as GaLore's Table 2 counts them "
             "(python model.py --memory). vs full: tokens/s relative to full-rank AdamW at the same size."]
    text = "\n".join(lines + paper + notes) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Benchmark: {os.path.basename(os.path.normpath(out))}\n\n" + text)
    return text


def plot(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (the tables are written)")
        return
    for size in sorted({r["size"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            log = os.path.join(out, "runs", f"{r['method']}_{size}", "log.jsonl")
            if r["size"] != size or not os.path.exists(log):
                continue
            records = [json.loads(line) for line in open(log)]
            ax.plot([x["tokens"] for x in records], [x["loss"] for x in records],
                    label=LABELS.get(r["method"], r["method"]), lw=1.2)
        ax.set(xlabel="training tokens", ylabel="training loss", title=f"LLaMA {size}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"loss_{size}.png"), dpi=120)
        plt.close(fig)


def main():
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], "runs")):
        sys.exit("usage: python report.py RESULTS_DIR (a folder that bench.sh wrote, with runs/ inside)")
    out = sys.argv[1]
    rows = load_runs(out)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows, out))
    plot(rows, out)
    print(f"-> {out}/results.md, {out}/results.csv")


if __name__ == "__main__":
    main()
