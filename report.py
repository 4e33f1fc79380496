"""
Tabulate a bench.sh sweep: results.md (mean and spread over seeds, memory and speed against full-rank, the
differences beyond the seed spread), results.csv (one line per run), lr_sweep.md when the sweep swept lrs, and per
size the mean loss curves (loss_<size>.png) and the memory counted (memory_<size>.png) if matplotlib is installed.

    python report.py results/2026-11-25-cpu                    # every run in its runs/
    python report.py results/2026-11-25-cpu RUN_DIR ...        # these runs alone (bench.sh: its sweep's)
"""
import csv
import glob
import math
import json
import os
import re
import statistics
import sys

from data import corpus_and_tokenizer
from model import BENCH_ROWS, RECIPES, SEQ_LEN, SIZES, estimate_bytes

LABELS = {"full": "Full-rank AdamW", "galore": "GaLore", "fira": "Fira", "lowrank": "Low-rank",
          "lowrank_restarts": "Low-rank + restarts", "sltrain": "SLTrain", "sltrain_restarts": "SLTrain + restarts",
          "lora": "LoRA", "relora": "ReLoRA", "stable_spam": "Stable-SPAM", "spam": "SPAM", "muon": "Muon",
          "apollo": "APOLLO", "apollo_mini": "APOLLO-Mini"}

# C4 validation perplexity (memory in GB, bf16) as the papers report them: full budgets, T5 tokenizer (32,000
# tokens), each C4 document one sequence. GaLore (Zhao et al. 2024) Table 2 counts weights + optimizer states;
# Fira (Chen et al. 2024) Table 3 adds the gradients. Glentis et al. (2025) give 1b alone, quoted by third
# parties (their full-rank 13.97 is probably Stable-SPAM, not plain Adam); their companion paper (same setup),
# weights + optimizer states, is the source at 60m-350m where the benchmark's own papers have no number.
GLENTIS, COMPANION = "Glentis et al. 2025, as quoted", "companion paper (arXiv 2506.16659) table"
PAPER = {
    "full": [("GaLore Table 2", {"60m": (34.06, 0.36), "130m": (25.08, 0.76), "350m": (18.80, 2.06),
                                 "1b": (15.56, 7.80)}),
             (f"{COMPANION}, Adam", {"60m": (30.05, 0.35), "130m": (23.13, 0.81), "350m": (18.77, 2.21),
                                     "1b": (16.52, 8.04)}),
             (f"{GLENTIS}, best full-rank", {"1b": (13.97, None)})],
    "galore": [("GaLore Table 2", {"60m": (34.88, 0.24), "130m": (25.36, 0.52), "350m": (18.95, 1.22),
                                   "1b": (15.64, 4.38)}),
               (COMPANION, {"60m": (34.58, 0.28), "130m": (25.31, 0.61), "350m": (19.37, 1.59), "1b": (15.57, 4.76)})],
    "fira": [("Fira Table 3 (memory incl. gradients)", {"60m": (31.06, 0.36), "130m": (22.73, 0.77),
                                                        "350m": (16.85, 1.90), "1b": (14.31, 6.98)}),
             (COMPANION, {"60m": (30.34, 0.28), "130m": (22.96, 0.61), "350m": (16.82, 1.59), "1b": (15.10, 4.76)})],
    "lowrank": [("GaLore Table 2", {"60m": (78.18, 0.26), "130m": (45.51, 0.54), "350m": (37.41, 1.08),
                                    "1b": (142.53, 3.57)})],
    "lowrank_restarts": [(GLENTIS, {"1b": (15.013, None)})],
    "sltrain_restarts": [(GLENTIS, {"1b": (14.37, None)})],
    # APOLLO (Zhu et al., MLSys 2025) Table 2: rank d/4 (Mini: 1), lr 0.01, memory weights + optimizer states
    "apollo": [("APOLLO Table 2", {"60m": (31.55, 0.24), "130m": (22.94, 0.52), "350m": (16.85, 1.22),
                                   "1b": (14.20, 4.38)}),
               (COMPANION, {"60m": (30.94, 0.28), "130m": (22.93, 0.61), "350m": (16.75, 1.59), "1b": (14.20, 4.76)})],
    "apollo_mini": [("APOLLO Table 2", {"60m": (31.93, 0.12), "130m": (23.53, 0.25), "350m": (17.18, 0.69),
                                        "1b": (14.17, 2.60)}),
                    (COMPANION, {"60m": (31.85, 0.25), "130m": (23.63, 0.46), "350m": (17.11, 1.00),
                                 "1b": (14.13, 3.20)})],
    "stable_spam": [(COMPANION, {"60m": (28.77, 0.35), "130m": (22.20, 0.81), "350m": (16.80, 2.21),
                                 "1b": (13.97, 8.04)})],
    "muon": [(COMPANION, {"60m": (28.86, 0.23), "130m": (22.20, 0.54), "350m": (16.70, 1.47), "1b": (14.18, 5.36)})],
}

# the papers' pairs (a, b), whose ordering their claims are about (b − a in the table of differences)
PAIRS = [("lowrank", "lowrank_restarts"), ("sltrain", "sltrain_restarts"), ("lora", "relora"), ("galore", "fira"),
         ("lowrank_restarts", "galore"), ("lowrank_restarts", "fira")]

COLUMNS = ["method", "size", "dataset", "vocab_size", "sequences", "lr", "seed", "status", "rank", "precision",
           "tokens", "val_ppl", "val_loss", "weights_mib", "grads_mib", "states_mib", "buffers_mib",
           "bf16_estimate_mib", "peak_tensor_mib", "peak_gpu_mib", "tokens_per_s", "mfu", "device"]
RUN = re.compile(r"(.+?)(?:_lr([^_]+))?_([^_]+)_s(\d+)$")  # <row>_<size>_s<seed>, in an lr sweep <row>_lr<lr>_...
SPEED_RUN = re.compile(r"(.+?)_([^_]+)_r(\d+)$")  # bench.sh's speed pass: speed/<row>_<size>_r<round>


def load_runs(out, runs=None):
    """One row per run folder: the given ones, or every one under out/runs."""
    rows = []
    for run in sorted(runs or glob.glob(os.path.join(out, "runs", "*_*_s*"))):
        match = RUN.match(os.path.basename(os.path.normpath(run)))
        if not match or not os.path.isdir(run):
            continue  # not a run folder (a leftover *.tmp, say)
        method, sweep_lr, size, seed = match.groups()
        row = {"method": method, "sweep_lr": sweep_lr, "lr": sweep_lr, "size": size, "seed": int(seed), "dir": run}
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
    rows.sort(key=lambda r: (r["size"], order.get(r["method"], len(order)), lr_value(r["sweep_lr"]), r["seed"]))
    return rows


def load_speed(out, runs=None):
    """The speed pass's runs (each row alone on the machine, the rows in turn, round after round): one dict per
    finished run, with its row, size, round, tokens/s, threads and the load average at its end."""
    speed = []
    for run in sorted(runs or glob.glob(os.path.join(out, "speed", "*_r*"))):
        match = SPEED_RUN.match(os.path.basename(os.path.normpath(run)))
        result = os.path.join(run, "result.json")
        if match and os.path.exists(result):
            r = json.load(open(result))
            method, size, round_ = match.groups()
            speed.append({"method": method, "size": size, "round": int(round_), "tokens_per_s": r["tokens_per_s"],
                          "steps": r["steps"], "threads": r.get("threads"), "load_avg": r.get("load_avg")})
    return speed


def side_by_side(lines, speed):
    """Each row's tokens/s from the speed pass (median over rounds) and its ratio to full-rank's in the same round
    (median, min and max over the rounds), where the speed pass timed both."""
    for line in lines:
        at, full = ({s["round"]: s["tokens_per_s"] for s in speed if (s["size"], s["method"]) == (line["size"], m)}
                    for m in (line["method"], "full"))
        ratios = [at[k] / full[k] for k in at if k in full and at[k] and full[k]]
        if line["ok"] and ratios:
            line.update(tps=statistics.median(at.values()), rel_speed=statistics.median(ratios),
                        rel_speed_range=(min(ratios), max(ratios)), speed_rounds=len(ratios))
        elif speed:  # one table, one way of measuring speed: a row the speed pass missed has none
            line.pop("rel_speed", None)
            line["tps"] = None


def lr_value(lr):
    """A folder's lr as a number for sorting (0 outside an lr sweep); a name that is no number sorts last."""
    try:
        return float(lr or 0)
    except ValueError:
        return math.inf


def result_row(r, size):
    """The table's columns of one result.json."""
    mib = 2**20
    # results written before a run recorded its dataset have none; before documents, every run packed windows
    row = dict(status="ok", dataset=r.get("dataset"), vocab_size=r.get("vocab_size"),
               sequences=r.get("sequences", "windows"), rank=r.get("rank"), lr=r.get("lr"), precision=r["precision"],
               tokens=r["tokens"], steps=r.get("steps"), official_ppl=r.get("val_ppl_official_style"),
               val_tokens=r.get("val_tokens"),
               val_ppl=r["val_ppl"], val_loss=r["val_loss"], device=r["device"],
               weights_mib=r["weights_bytes"] / mib, grads_mib=r["grads_bytes"] / mib,
               states_mib=r["optimizer_state_bytes"] / mib, buffers_mib=r["buffers_bytes"] / mib,
               tokens_per_s=r["tokens_per_s"], mfu=r["mfu"],
               peak_tensor_mib=r["peak_tensor_bytes"] / mib if "peak_tensor_bytes" in r else None,
               peak_gpu_mib=r["max_memory_allocated_bytes"] / mib if "max_memory_allocated_bytes" in r else None)
    row["memory_mib"] = row["weights_mib"] + row["grads_mib"] + row["states_mib"] + row["buffers_mib"]
    est = estimate_bytes(size, r["method"], "bf16", r, r.get("vocab_size"))
    row["bf16_estimate_mib"] = (est["weights_bytes"] + est["optimizer_state_bytes"]) / mib
    return row


def summarize(rows):
    """One line per (method, size, swept lr): the mean over the seeds that finished, and their spread."""
    groups = {}
    for r in rows:
        groups.setdefault((r["size"], r["method"], r["sweep_lr"]), []).append(r)
    lines = []
    for (size, method, sweep_lr), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        line = {"method": method, "size": size, "sweep_lr": sweep_lr, "runs": runs, "ok": ok}
        if ok:
            ppl = [r["val_ppl"] for r in ok]
            line.update(ppl=statistics.mean(ppl), ppl_sd=statistics.stdev(ppl) if len(ppl) > 1 else None,
                        ppl_min=min(ppl), ppl_max=max(ppl), tps=statistics.mean(r["tokens_per_s"] or 0 for r in ok))
            for key in ("mfu", "peak_tensor_mib", "peak_gpu_mib"):
                values = [r[key] for r in ok if r[key] is not None]
                line[key] = statistics.mean(values) if values else None
        lines.append(line)
    best = best_lines(lines)
    for line in lines:  # memory and throughput relative to full-rank AdamW (at its best lr) at the same size
        full = best.get((line["size"], "full"))
        if full and full["ok"] and line["ok"]:
            line["rel_memory"] = line["ok"][0]["memory_mib"] / full["ok"][0]["memory_mib"]
            if full["tps"] and line["tps"]:
                line["rel_speed"] = line["tps"] / full["tps"]
    return lines


def best_lines(lines):
    """{(size, method): its line of the lowest mean ppl}: in an lr sweep the row at its best lr, else its line."""
    best = {}
    for line in lines:
        key, kept = (line["size"], line["method"]), best.get((line["size"], line["method"]))
        if kept is None or (line["ok"] and (not kept["ok"] or line["ppl"] < kept["ppl"])):
            best[key] = line
    return best


TOKENIZER_NAMES = {"gpt2": "GPT-2", "bytes": "byte-level", "t5": "T5"}


def dataset_cell(run):
    """A run's dataset and its tokenizer, as c4-t5 (T5 tokenizer)."""
    if run["dataset"] is None:
        return "not recorded"
    tokenizer = corpus_and_tokenizer(run["dataset"])[1]
    return f"{run['dataset']} ({TOKENIZER_NAMES.get(tokenizer, tokenizer)} tokenizer)"


def not_comparable(line):
    """Why a row cannot stand beside the papers' numbers (their size, full budget, corpus, tokenizer and
    sequences), or "" when it can."""
    run, size = line["ok"][0], line["size"]
    sizes = [s for s in SIZES if any(s in numbers for _, numbers in PAPER[line["method"]])]
    reasons = []
    if size not in sizes:
        reasons.append(f"size {size}, the papers report {', '.join(sizes)}")
    else:
        budget = RECIPES[size].steps * RECIPES[size].batch * SEQ_LEN
        if run["tokens"] != budget:
            reasons.append(f"{100 * run['tokens'] / budget:.3g}% of the papers' budget")
        elif run["steps"] != RECIPES[size].steps:  # their tokens in other steps (another batch or sequence length)
            reasons.append(f"{run['steps']:,} steps, the papers' are {RECIPES[size].steps:,}")
    if run["dataset"] is None:
        reasons.append("dataset not recorded")
    else:
        corpus, tokenizer = corpus_and_tokenizer(run["dataset"])
        if corpus != "c4":
            reasons.append(f"corpus {corpus}, the papers' is C4")
        if tokenizer != "t5":
            reasons.append(f"{TOKENIZER_NAMES.get(tokenizer, tokenizer)} tokenizer, the papers' is T5's")
        elif run["vocab_size"] != 32_000:
            reasons.append(f"vocabulary {run['vocab_size']}, the papers' is 32,000")
    if run["sequences"] != "documents":
        reasons.append("packed windows, the papers' are documents")
    if size in sizes and (run["val_tokens"] or 0) < RECIPES[size].val_tokens:
        reasons.append(f"validated on {run['val_tokens']:,} scored tokens, the official code's "
                       f"{RECIPES[size].val_tokens:,}" if run["val_tokens"] else "validation size not recorded")
    return "; ".join(reasons)


def ppl_cell(line):
    text = f"{line['ppl']:.2f}"
    if line["ppl_sd"] is not None:
        text += f" ± {line['ppl_sd']:.2f}"
    return text


def label(line):
    name = LABELS.get(line["method"], line["method"])
    return f"{name} (lr {line['sweep_lr']})" if line["sweep_lr"] else name


def comparison(a, b):
    """A table row: b's mean ppl minus a's, and whether it exceeds the seed spread, sd(a) + sd(b)."""
    diff = b["ppl"] - a["ppl"]
    if a["ppl_sd"] is None or b["ppl_sd"] is None:
        spread, verdict = "-", "one seed: spread unknown"
    else:
        spread = f"{a['ppl_sd'] + b['ppl_sd']:.2f}"
        lower = label(b if diff < 0 else a)
        verdict = f"yes: {lower} lower" if abs(diff) > a["ppl_sd"] + b["ppl_sd"] else "no"
    return (f"| {a['size']} | {label(b)} vs {label(a)} | {ppl_cell(b)} | {ppl_cell(a)} | {diff:+.2f} | {spread} "
            f"| {verdict} |")


def speed_note(lines, speed):
    """How the table's tokens/s were measured, and under what load."""
    timed = [s for s in speed if s["tokens_per_s"]]
    if not any("speed_rounds" in line for line in lines):
        return ("tokens/s: training tokens per second of optimizer steps after the first, evaluation excluded, mean "
                "over the seeds' runs; tokens/s vs full: over full-rank AdamW's at the same size. These come from "
                "the sweep's runs: on a GPU each run had its GPU alone; runs that shared a machine (DEVICES naming "
                "cpu more than once, or another load) are not a side-by-side measurement.")
    threads = sorted({s["threads"] for s in timed if s["threads"]})
    loads = [s["load_avg"] for s in timed if s["load_avg"] is not None]
    rounds = max(line.get("speed_rounds", 0) for line in lines)
    return (f"tokens/s: from bench.sh's speed pass, after the sweep: each row {timed[0]['steps']} steps alone on the "
            f"machine ({'/'.join(map(str, threads)) or '?'} threads), the rows in turn, {rounds} rounds; training "
            "tokens per second of optimizer steps after the first, evaluation excluded, the median over the rounds. "
            "tokens/s vs full: the row's tokens/s over full-rank AdamW's in the same round, median (min-max) over "
            "the rounds. "
            + (f"1-minute load average at the speed runs' ends: {min(loads):.1f}-{max(loads):.1f} (the run itself "
               "adds about its threads)." if loads else ""))


def markdown(rows, lines, out, speed=()):
    table = ["| method | size | dataset | lr | rank | seeds | tokens | val ppl "
             "| weights + grads + states (MiB, as trained) | memory vs full | bf16 estimate (MiB) | peak tensors (MiB) "
             "| peak GPU (MiB) | tokens/s | tokens/s vs full | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        failed = [r for r in line["runs"] if r["status"] != "ok"]
        note = "; ".join(f"seed {r['seed']} {r['status']}" for r in failed)
        if not line["ok"]:
            table.append(f"| {LABELS.get(line['method'], line['method'])} | {line['size']} | "
                         f"| {line['sweep_lr'] or ''} | | | | {note} | | | | | | | | |")
            continue
        first = line["ok"][0]
        ppl = ppl_cell(line)
        if line["ppl_sd"] is not None:
            ppl += f" (min {line['ppl_min']:.2f}, max {line['ppl_max']:.2f})"
        if note:
            ppl += f"; {note}"
        memory = f"{first['memory_mib']:.1f} ({first['precision']})"
        if first["buffers_mib"]:
            memory += f" incl. {first['buffers_mib']:.1f} indices"
        memory_ratio, speed_ratio = (f"{line[k]:.2f}" if k in line else "-" for k in ("rel_memory", "rel_speed"))
        if "rel_speed_range" in line and line["method"] != "full":
            speed_ratio += " ({:.2f}-{:.2f})".format(*line["rel_speed_range"])
        peak, tps = (" | ".join(f"{line[k]:,.0f}" if line[k] else "-" for k in keys)
                     for keys in (("peak_tensor_mib", "peak_gpu_mib"), ("tps",)))
        mfu = f"{100 * line['mfu']:.1f}%" if line["mfu"] else "-"
        table.append(f"| {LABELS.get(line['method'], line['method'])} | {line['size']} | {dataset_cell(first)} "
                     f"| {first['lr'] or '-'} | {first['rank'] or 'full'} | {len(line['ok'])} | {first['tokens']:,} "
                     f"| {ppl} | {memory} "
                     f"| {memory_ratio} | {first['bf16_estimate_mib']:.1f} | {peak} | {tps} "
                     f"| {speed_ratio} | {mfu} |")
    best = {key: line for key, line in best_lines(lines).items() if line["ok"]}
    compared = [(size, a, b) for size in sorted({s for s, _ in best})
                for a, b in [("full", m) for s, m in best if s == size and m != "full"] + PAIRS
                if (size, a) in best and (size, b) in best]
    differences = ["", "Differences in val ppl (each row at its best lr where lrs were swept): every row against "
                   "full-rank AdamW, then the papers' pairs:", "",
                   "| size | comparison (b vs a) | ppl b | ppl a | b − a | seed spread | beyond the spread? |",
                   "|---|---|---|---|---|---|---|"]
    differences += [comparison(best[size, a], best[size, b]) for size, a, b in compared]
    if not compared:
        differences = []
    paper = []  # the rows of methods the papers report: their numbers, or why they cannot stand beside ours
    for line in best_lines(lines).values():
        if not line["ok"] or line["method"] not in PAPER:
            continue
        ours = (f"| {LABELS[line['method']]} | {line['size']} | {dataset_cell(line['ok'][0])} | {ppl_cell(line)} "
                f"| {line['ok'][0]['tokens']:,} |")
        reason = not_comparable(line)
        if reason:
            paper.append(f"{ours} not comparable: {reason} | | | |")
            continue
        official = [r["official_ppl"] for r in line["ok"] if r["official_ppl"] is not None]
        official = f"{statistics.mean(official):.2f}" if official else "-"
        for source, numbers in PAPER[line["method"]]:
            if line["size"] in numbers:
                ppl, gb = numbers[line["size"]]
                paper.append(f"{ours} {ppl} | {gb or '-'} | {source} | {official} |")
    if paper:
        paper = ["", "Reported by the papers (validation ppl on C4 in T5 tokens, memory GB in bf16), beside the rows "
                 "that are comparable: the papers' size and full budget on c4-t5, each document one sequence:", "",
                 "| method | size | dataset | our ppl | our tokens | paper ppl | paper memory (GB) | source "
                 "| our ppl, official-style |", "|---|---|---|---|---|---|---|---|---|", *paper,
                 "", "our ppl, official-style: as the papers' code computes it, the mean of the evaluation "
                 "batches' mean losses divided by their count + 1, which reads low by a factor of about 1/(n+1) in "
                 "the loss for n batches (docs/details.md); our ppl weights every token once."]
    notes = ["", "dataset: <corpus>-<tokenizer> (GPT-2's ids when the name has no tokenizer). "
             "val ppl: mean over the seeds that finished, ± their sample standard deviation when there are "
             "several. weights + grads + states: bytes counted from the live tensors in the run's precision "
             "(+ SLTrain's int32 support indices); memory vs full: that sum over full-rank AdamW's at the same size. "
             "bf16 estimate: weights + optimizer states at 2 bytes each, as GaLore's "
             "Table 2 counts them (python model.py --memory). peak tensors: the most bytes of live tensors in the "
             "first training step, measured on any device (model.PeakTensorBytes: weights, gradients, states, "
             "activations, the loss; not kernels' workspaces nor the allocator's cache). peak GPU: "
             "torch.cuda.max_memory_allocated after one warm-up step. " + speed_note(lines, speed) + " MFU: model "
             "FLOPs (6 per trained weight, 4 per frozen one, plus attention) per second over the GPU's dense bf16 "
             "peak. Differences: b − a is b's mean ppl minus a's (negative: b lower); "
             "the seed spread is sd(a) + sd(b), the sum of their sample standard deviations, and a difference is "
             "beyond the spread when |b − a| > sd(a) + sd(b); with one seed of either row the spread is unknown."]
    text = "\n".join(table + differences + paper + notes) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Benchmark: {os.path.basename(os.path.normpath(out))}\n\n" + text)
    return text


def lr_sweep(lines, out):
    """lr_sweep.md, when the runs swept lrs: per size, each row's mean ppl at every lr, and its best lr."""
    swept = [line for line in lines if line["sweep_lr"]]
    if not swept:
        return ""
    text = [f"# Learning-rate sweep: {os.path.basename(os.path.normpath(out))}", ""]
    for size in sorted({line["size"] for line in swept}):
        lrs = sorted({line["sweep_lr"] for line in swept if line["size"] == size}, key=lr_value)
        text += [f"## {size}", "", "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best lr |",
                 "|---" * (len(lrs) + 2) + "|"]
        for key, best in best_lines(swept).items():
            if key[0] != size:
                continue
            at = {line["sweep_lr"]: line for line in swept if (line["size"], line["method"]) == key}
            cells = [(ppl_cell(at[lr]) if at[lr]["ok"] else "failed") if lr in at else "-" for lr in lrs]
            chosen = "none finished"
            if best["ok"]:
                chosen = best["sweep_lr"]
                if len(at) > 2 and best["sweep_lr"] in (min(at, key=lr_value), max(at, key=lr_value)):
                    chosen += " (an end of the range: widen the sweep)"
            text.append(f"| {LABELS.get(best['method'], best['method'])} | " + " | ".join(cells) + f" | {chosen} |")
        text.append("")
    text.append("val ppl: mean over the seeds that finished (± their sample standard deviation when there are "
                "several); best lr: the lowest mean. results.md holds every (row, lr) and compares each row at "
                "its best lr.")
    text = "\n".join(text) + "\n"
    with open(os.path.join(out, "lr_sweep.md"), "w") as f:
        f.write(text)
    return text


def plot(lines, out):
    """loss_<size>.png, the mean training loss of each row, and memory_<size>.png, its weights, gradients and
    states stacked (each row at its best lr where lrs were swept)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no plots: pip install matplotlib, then python report.py {out}")
        return
    best = [line for line in best_lines(lines).values() if line["ok"]]
    for size in sorted({line["size"] for line in best}):
        at_size = [line for line in best if line["size"] == size]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        top = -math.inf  # the y axis leaves out the first tenth of training, where every curve falls steeply
        for i, line in enumerate(at_size):
            curves = []  # every seed logs the same steps: average the loss step by step
            for r in line["ok"]:
                log = os.path.join(r["dir"], "log.jsonl")
                curves.append({x["tokens"]: x["loss"] for x in map(json.loads, open(log))})
            tokens = sorted(set.intersection(*(set(c) for c in curves)))
            loss = [statistics.mean(c[t] for c in curves) for t in tokens]
            top = max([top] + [x for t, x in zip(tokens, loss) if t >= 0.1 * tokens[-1]])
            ax.plot(tokens, loss, lw=1.2, color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--",
                    label=f"{label(line)} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        ax.set(xlabel="training tokens", ylabel="training loss (mean over seeds)", title=f"LLaMA {size}")
        if math.isfinite(top):
            ax.set_ylim(top=top + 0.05 * abs(top))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        fig.savefig(os.path.join(out, f"loss_{size}.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 1 + 0.4 * len(at_size)))
        names = [label(line) for line in at_size]
        left = [0.0] * len(at_size)
        for key, part in (("weights_mib", "weights"), ("grads_mib", "gradients"), ("states_mib", "optimizer states"),
                          ("buffers_mib", "indices")):
            widths = [line["ok"][0][key] for line in at_size]
            if any(widths):
                ax.barh(names, widths, left=left, label=part)
                left = [x + w for x, w in zip(left, widths)]
        ax.set_xlim(0, 1.04 * max(left))  # the longest bar ends inside the frame
        precision = at_size[0]["ok"][0]["precision"]
        ax.set_xlabel(f"MiB counted from the live tensors ({precision})")
        ax.set_title(f"LLaMA {size}: memory", pad=24)
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
        fig.savefig(os.path.join(out, f"memory_{size}.png"), dpi=120, bbox_inches="tight")
        plt.close(fig)


def main():
    if len(sys.argv) < 2 or not os.path.isdir(os.path.join(sys.argv[1], "runs")):
        sys.exit("usage: python report.py RESULTS_DIR [RUN_DIR ...] (a folder that bench.sh wrote, with runs/ inside)")
    out = sys.argv[1]
    given = sys.argv[2:]  # bench.sh names this sweep's runs, and its speed pass's under speed/
    in_speed = [r for r in given if os.path.basename(os.path.dirname(os.path.normpath(r))) == "speed"]
    rows = load_runs(out, [r for r in given if r not in in_speed])
    speed = load_speed(out, in_speed) if in_speed or not given else []
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if speed:
        with open(os.path.join(out, "speed.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(speed[0]))
            writer.writeheader()
            writer.writerows(speed)
    lines = summarize(rows)
    side_by_side(lines, speed)
    print(markdown(rows, lines, out, speed))
    sweep = lr_sweep(lines, out)
    if sweep:
        print(sweep)
    plot(lines, out)
    print(f"-> {out}/results.md, {out}/results.csv" + (f", {out}/speed.csv" if speed else "")
          + (f", {out}/lr_sweep.md" if sweep else ""))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line and a failing status, never a traceback (bench.sh stops on it)
        sys.exit(f"error: report.py failed: {type(e).__name__}: {e}"[:300])
