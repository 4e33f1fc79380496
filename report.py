"""
Tabulate a bench.sh sweep: results.md (mean and spread over seeds), results.csv (one line per run) and the
mean loss curves per size (loss_<size>.png, if matplotlib is installed).

    python report.py results/2026-11-25-cpu                    # every run in its runs/
    python report.py results/2026-11-25-cpu RUN_DIR ...        # these runs alone (bench.sh: its sweep's)
"""
import csv
import glob
import json
import os
import re
import statistics
import sys

from model import BENCH_ROWS, estimate_bytes

LABELS = {"full": "Full-rank AdamW", "galore": "GaLore", "fira": "Fira", "lowrank": "Low-rank",
          "lowrank_restarts": "Low-rank + restarts", "sltrain": "SLTrain", "sltrain_restarts": "SLTrain + restarts",
          "lora": "LoRA", "relora": "ReLoRA", "stable_spam": "Stable-SPAM", "spam": "SPAM", "muon": "Muon",
          "apollo": "APOLLO", "apollo_mini": "APOLLO-Mini"}

# C4 validation perplexity (memory in GB, bf16) as the papers report them, full budgets, T5 tokenizer (32,000
# tokens: their embeddings are smaller than ours). GaLore (Zhao et al. 2024) Table 2 counts weights +
# optimizer states; Fira (Chen et al. 2024) Table 3 adds the gradients. Glentis et al. (2025) at 1b, quoted by
# third parties (their full-rank 13.97 is probably Stable-SPAM, not plain Adam); their companion paper
# (arXiv 2506.16659, same setup) gives weights + optimizer states.
PAPER = {
    "full": [("GaLore Table 2", {"60m": (34.06, 0.36), "130m": (25.08, 0.76), "350m": (18.80, 2.06),
                                 "1b": (15.56, 7.80)}),
             ("Glentis et al. companion, Adam", {"60m": (30.05, 0.35), "130m": (23.13, 0.81),
                                                 "350m": (18.77, 2.21), "1b": (16.52, 8.04)}),
             ("Glentis et al., best full-rank", {"1b": (13.97, None)})],
    "galore": [("GaLore Table 2", {"60m": (34.88, 0.24), "130m": (25.36, 0.52), "350m": (18.95, 1.22),
                                   "1b": (15.64, 4.38)}),
               ("Glentis et al. companion", {"60m": (34.58, 0.28), "130m": (25.31, 0.61), "350m": (19.37, 1.59),
                                             "1b": (15.57, 4.76)})],
    "fira": [("Fira Table 3 (memory incl. gradients)", {"60m": (31.06, 0.36), "130m": (22.73, 0.77),
                                                        "350m": (16.85, 1.90), "1b": (14.31, 6.98)}),
             ("Glentis et al. companion", {"60m": (30.34, 0.28), "130m": (22.96, 0.61), "350m": (16.82, 1.59),
                                           "1b": (15.10, 4.76)})],
    "lowrank": [("GaLore Table 2", {"60m": (78.18, 0.26), "130m": (45.51, 0.54), "350m": (37.41, 1.08),
                                    "1b": (142.53, 3.57)})],
    "lowrank_restarts": [("Glentis et al.", {"1b": (15.013, None)})],
    "sltrain_restarts": [("Glentis et al.", {"1b": (14.37, None)})],
    # APOLLO (Zhu et al., MLSys 2025) Table 2: rank d/4 (Mini: 1), lr 0.01, memory weights + optimizer states
    "apollo": [("APOLLO Table 2", {"60m": (31.55, 0.24), "130m": (22.94, 0.52), "350m": (16.85, 1.22),
                                   "1b": (14.20, 4.38)}),
               ("Glentis et al. companion", {"60m": (30.94, None), "130m": (22.93, None), "350m": (16.75, None),
                                             "1b": (14.20, None)})],
    "apollo_mini": [("APOLLO Table 2", {"60m": (31.93, 0.12), "130m": (23.53, 0.25), "350m": (17.18, 0.69),
                                        "1b": (14.17, 2.60)}),
                    ("Glentis et al. companion", {"60m": (31.85, None), "130m": (23.63, None),
                                                  "350m": (17.11, None), "1b": (14.13, None)})],
    # the companion paper's table, as its Adam row (weights + states)
    "stable_spam": [("Glentis et al. companion", {"60m": (28.77, 0.35), "130m": (22.20, 0.81), "350m": (16.80, 2.21),
                                                  "1b": (13.97, 8.04)})],
    "muon": [("Glentis et al. companion", {"60m": (28.86, 0.23), "130m": (22.20, 0.54), "350m": (16.70, 1.47),
                                           "1b": (14.18, 5.36)})],
}

COLUMNS = ["method", "size", "seed", "status", "rank", "precision", "tokens", "val_ppl", "val_loss",
           "weights_states_mib", "buffers_mib", "bf16_estimate_mib", "peak_tensor_mib",
           "peak_gpu_mib", "tokens_per_s", "mfu", "device"]
RUN = re.compile(r"(.+)_([^_]+)_s(\d+)$")  # <row>_<size>_s<seed>


def load_runs(out, runs=None):
    """One row per run folder: the given ones, or every one under out/runs."""
    rows = []
    for run in sorted(runs or glob.glob(os.path.join(out, "runs", "*_*_s*"))):
        match = RUN.match(os.path.basename(os.path.normpath(run)))
        if not match or not os.path.isdir(run):
            continue  # not a run folder (a leftover *.tmp, say)
        method, size, seed = match.groups()
        row = {"method": method, "size": size, "seed": int(seed)}
        result, failed = os.path.join(run, "result.json"), os.path.join(run, "failed.json")
        if os.path.exists(result):
            try:
                row.update(result_row(json.load(open(result)), size))
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"error: {result} is not a result of this repository's scripts ({type(e).__name__}: {e})")
        elif os.path.exists(failed):
            row["status"] = "failed: " + json.load(open(failed))["reason"]
        else:
            row["status"] = "incomplete"
        rows.append(row)
    order = {m: i for i, m in enumerate(BENCH_ROWS)}
    rows.sort(key=lambda r: (r["size"], order.get(r["method"], len(order)), r["seed"]))
    return rows


def result_row(r, size):
    """The table's columns of one result.json."""
    row = dict(status="ok", rank=r.get("rank"), precision=r["precision"], tokens=r["tokens"],
               val_ppl=r["val_ppl"], val_loss=r["val_loss"], device=r["device"],
               weights_states_mib=(r["weights_bytes"] + r["optimizer_state_bytes"]) / 2**20,
               buffers_mib=r["buffers_bytes"] / 2**20, tokens_per_s=r["tokens_per_s"], mfu=r["mfu"],
               peak_tensor_mib=r["peak_tensor_bytes"] / 2**20 if "peak_tensor_bytes" in r else None,
               peak_gpu_mib=r["max_memory_allocated_bytes"] / 2**20 if "max_memory_allocated_bytes" in r else None)
    est = estimate_bytes(size, r["method"], "bf16", r, r.get("vocab_size"))
    row["bf16_estimate_mib"] = (est["weights_bytes"] + est["optimizer_state_bytes"]) / 2**20
    return row


def summarize(rows):
    """One line per (method, size): the mean over the seeds that finished, and their spread."""
    groups = {}
    for r in rows:
        groups.setdefault((r["size"], r["method"]), []).append(r)
    lines = []
    for (size, method), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        line = {"method": method, "size": size, "runs": runs, "ok": ok}
        if ok:
            ppl = [r["val_ppl"] for r in ok]
            line.update(ppl=statistics.mean(ppl), ppl_sd=statistics.stdev(ppl) if len(ppl) > 1 else None,
                        ppl_min=min(ppl), ppl_max=max(ppl), tps=statistics.mean(r["tokens_per_s"] or 0 for r in ok))
            for key in ("mfu", "peak_tensor_mib", "peak_gpu_mib"):
                values = [r[key] for r in ok if r[key] is not None]
                line[key] = statistics.mean(values) if values else None
        lines.append(line)
    for line in lines:  # throughput relative to full-rank AdamW at the same size
        full = next((f for f in lines if f["method"] == "full" and f["size"] == line["size"] and f.get("tps")), None)
        if full and line.get("tps"):
            line["rel_speed"] = line["tps"] / full["tps"]
    return lines


def markdown(rows, lines, out):
    table = ["| method | size | rank | seeds | tokens | val ppl | weights + states (MiB, as trained) "
             "| bf16 estimate (MiB) | peak tensors (MiB) | peak GPU (MiB) | tokens/s | vs full | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        label, failed = LABELS.get(line["method"], line["method"]), [r for r in line["runs"] if r["status"] != "ok"]
        note = "; ".join(f"seed {r['seed']} {r['status']}" for r in failed)
        if not line["ok"]:
            table.append(f"| {label} | {line['size']} | | | | {note} | | | | | | | |")
            continue
        first = line["ok"][0]
        ppl = f"{line['ppl']:.2f}"
        if line["ppl_sd"] is not None:
            ppl += f" ± {line['ppl_sd']:.2f} (min {line['ppl_min']:.2f}, max {line['ppl_max']:.2f})"
        if note:
            ppl += f"; {note}"
        memory = f"{first['weights_states_mib']:.1f} ({first['precision']})"
        if first["buffers_mib"]:
            memory += f" + {first['buffers_mib']:.1f} indices"
        peak = " | ".join(f"{line[k]:,.0f}" if line[k] else "-" for k in ("peak_tensor_mib", "peak_gpu_mib"))
        speed = f"{line['rel_speed']:.2f}" if "rel_speed" in line else "-"
        mfu = f"{100 * line['mfu']:.1f}%" if line["mfu"] else "-"
        table.append(f"| {label} | {line['size']} | {first['rank'] or 'full'} | {len(line['ok'])} "
                     f"| {first['tokens']:,} | {ppl} | {memory} | {first['bf16_estimate_mib']:.1f} | {peak} "
                     f"| {line['tps']:,.0f} | {speed} | {mfu} |")
    paper = ["", "Reported by the papers (C4, full budgets; ppl and memory GB) next to this sweep's mean ppl:", "",
             "| method | size | paper ppl | paper memory (GB) | source | our ppl | our tokens |",
             "|---|---|---|---|---|---|---|"]
    matched = False
    for line in lines:
        for source, numbers in PAPER.get(line["method"], []):
            if line["size"] in numbers:
                matched = True
                ppl, gb = numbers[line["size"]]
                ours = (f"{line['ppl']:.2f} | {line['ok'][0]['tokens']:,}" if line["ok"] else "failed |")
                paper.append(f"| {LABELS[line['method']]} | {line['size']} | {ppl} | {gb or '-'} | {source} | {ours} |")
    if not matched:
        paper = ["", "No size of this sweep is a paper size (60m, 130m, 350m, 1b), so there is nothing to put "
                 "next to the papers' numbers."]
    notes = ["", "val ppl: mean over the seeds that finished, ± their sample standard deviation when there are "
             "several. weights + states: bytes counted from the live tensors in the run's precision (+ SLTrain's "
             "int32 support indices). bf16 estimate: weights + optimizer states at 2 bytes each, as GaLore's "
             "Table 2 counts them (python model.py --memory). peak tensors: the most bytes of live tensors in the "
             "first training step, measured on any device (model.PeakTensorBytes: weights, gradients, states, "
             "activations, the loss; not kernels' workspaces nor the allocator's cache). peak GPU: "
             "torch.cuda.max_memory_allocated after one warm-up step. tokens/s: training tokens per second of "
             "optimizer steps after the first, evaluation excluded. MFU: model FLOPs (6 per trained weight, 4 per "
             "frozen one, plus attention) per second over the GPU's dense bf16 peak. vs full: tokens/s relative to "
             "full-rank AdamW at the same size."]
    text = "\n".join(table + paper + notes) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Benchmark: {os.path.basename(os.path.normpath(out))}\n\n" + text)
    return text


def plot(lines, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no loss plot: pip install matplotlib, then python report.py {out}")
        return
    for size in sorted({line["size"] for line in lines}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for line in lines:
            if line["size"] != size or not line["ok"]:
                continue
            curves = []  # every seed logs the same steps: average the loss step by step
            for r in line["ok"]:
                log = os.path.join(out, "runs", f"{line['method']}_{size}_s{r['seed']}", "log.jsonl")
                curves.append({x["tokens"]: x["loss"] for x in map(json.loads, open(log))})
            tokens = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(tokens, [statistics.mean(c[t] for c in curves) for t in tokens], lw=1.2,
                    label=f"{LABELS.get(line['method'], line['method'])} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.set(xlabel="training tokens", ylabel="training loss (mean over seeds)", title=f"LLaMA {size}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"loss_{size}.png"), dpi=120)
        plt.close(fig)


def main():
    if len(sys.argv) < 2 or not os.path.isdir(os.path.join(sys.argv[1], "runs")):
        sys.exit("usage: python report.py RESULTS_DIR [RUN_DIR ...] (a folder that bench.sh wrote, with runs/ inside)")
    out = sys.argv[1]
    rows = load_runs(out, sys.argv[2:])
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = summarize(rows)
    print(markdown(rows, lines, out))
    plot(lines, out)
    print(f"-> {out}/results.md, {out}/results.csv")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line and a failing status, never a traceback (bench.sh stops on it)
        sys.exit(f"error: report.py failed: {type(e).__name__}: {e}"[:300])
