"""
LoRA and ReLoRA for pretraining: a frozen full-rank W0 plus trainable low-rank B A, merged and restarted.

    python train_relora.py                                  # mini on CPU: 75 full-rank steps, then a merge every 75
    python train_relora.py --relora-every 0 --warm-start-steps 0   # plain LoRA (the benchmark's LoRA row)
    python train_relora.py --size 130m --dataset c4         # one GPU: 5K full-rank steps, then a merge every 5K
    torchrun --nproc_per_node=4 train_relora.py --size 350m --dataset c4

The method (LoRA for pretraining, Glentis et al. 2025; ReLoRA, Lialin et al., "ReLoRA: High-Rank Training Through
Low-Rank Updates", ICLR 2024): every attention/MLP matrix is W0 + B A alpha / r, W0 (m x n) the model's own init,
frozen; B (m x r) and A (r x n) train with AdamW, as do the embedding, head and norms. By default, ReLoRA as its
authors' code (Guitaricet/relora) runs it, their two runs (full rank, then ReLoRA) in one, for S steps:
    steps i = 0 .. N-1:  W0 trains full rank, B = 0 and A frozen;  lr_i = lr_w c(i / W, (i - W) / (S - W))
    the switch:          W0 freezes, B A trains; a brand-new AdamW for every parameter (the second run loads
                         the weights alone)
    steps j = 0 .. S-N-1 after it, a warmup (W2; W if N = 0) and cosine of their own over S - N steps:
                         lr_j = lr c(j / W2, (j - W2) / (S - N - W2)), except lr_j = lr (j - cK) / R c_end
                         for cK <= j < cK + R (c >= 1): 0 at j = K, 2K, ..., c_end = the cosine at j = cK + R
    after the lr-0 step j = cK:  W0 <- W0 + B A alpha / r;  A <- Kaiming;  B <- 0    merge (the function is kept)
                         M, V of B and A: 99.9% of the entries zeroed at random (ReLoRA's reset; all of
                         them in bf16), the step counter t kept
    the layer:           y = W0 x + B A dropout(x) alpha / r, dropout 0.1 on the low-rank branch's input
c(u, v) = u while u < 1 (the warmup, from 0), then min_lr_ratio + (1 - min_lr_ratio)(1 + cos(pi v)) / 2. A starts
at 0 as in ReLoRA's code, and B = A = 0 gets no gradient: the factors first train once the first merge draws A
(--a-init kaiming: from the switch on), while the embedding, head and norms train throughout.
Gradients and Adam moments r(m+n) per matrix, weights mn + r(m+n): the memory LoRA saves (the warm start needs
full-rank memory). K = N = 0 is plain LoRA as Glentis et al. (A Kaiming, no dropout, their warmup-cosine lr), whose
total update W - W0 = B A alpha / r has rank at most r.
"""

import contextlib
import math
import sys
import time

import torch

from data import evaluate, get_batch
from model import compressible_matrices, estimate_bytes, flops_per_token, get_config, tensor_bytes
from plumbing import (COUNT, OFF_OR_COUNT, POSITIVE, bounded, catch_stop_signals, check_val, checkpoint_due, ddp_wrap,
                      finish, load_data, lr_schedule, mean_loss, new_model, open_out_dir, output_paths, parse_args,
                      print_plan, progress_bar, resume, run_config, run_name, save_checkpoint, setup_batch,
                      setup_precision, setup_processes, setup_steps, shared_parser, stop_peak, stop_run, stop_signal,
                      time_estimate, time_step, track_peak, wrap_model, write_log, write_result)

# -----------------------------------------------------------------------------
# config: the flags every script shares (plumbing.py), then the method's; every default is the size's recipe

parser, size = shared_parser(__doc__)
# --- METHOD: begin ---
METHOD = "relora"
parser.add_argument("--lr", type=POSITIVE, help="peak learning rate (of the low-rank phase)")
parser.add_argument("--rank", type=COUNT, help="r, inner dimension of B A")
parser.add_argument("--alpha", type=POSITIVE, help="the layer computes W0 x + B A x alpha / r")
parser.add_argument("--relora-every", type=OFF_OR_COUNT, default=None,
                    help="K: merge B A into W0 and restart the factors after steps K, 2K, ... of the low-rank phase "
                         "(0: plain LoRA; default: a quarter of the run's steps)")
parser.add_argument("--warm-start-steps", type=OFF_OR_COUNT, default=None,
                    help="N: full-rank AdamW steps on W0 before B A trains (0: low rank from the first step; "
                         "default: a quarter of the run's steps)")
parser.add_argument("--warm-start-lr", type=POSITIVE, default=None,
                    help="peak lr of the warm start, whose warmup and cosine span the whole run (default: --lr / 2, "
                         "as ReLoRA's README: 5e-4 full rank, then 1e-3)")
parser.add_argument("--switch-warmup", type=OFF_OR_COUNT, default=None,
                    help="W2: after the warm start, the low-rank phase's own lr warmup from 0 (default: a tenth of "
                         "K, as the README's 500 of 5K)")
parser.add_argument("--restart-warmup", type=OFF_OR_COUNT, default=None,
                    help="R: at each merge the lr falls to 0 and climbs back over R steps (default: a fifth of K, "
                         "at most ReLoRA's 100)")
parser.add_argument("--prune", choices=["random", "magnitude"],
                    help="which entries of the factors' Adam moments a merge zeroes: drawn at random (ReLoRA's "
                         "default reset) or the smallest in magnitude")
parser.add_argument("--prune-ratio", type=bounded(float, 0, 1),
                    help="the fraction of each Adam moment of the factors a merge zeroes")
parser.add_argument("--lora-dropout", type=bounded(float, 0, 1), default=None,
                    help="dropout on the input of B A alone, not of W0 (default: ReLoRA's 0.1 if K > 0, "
                         "else 0 as Glentis et al.'s LoRA)")
parser.add_argument("--a-init", choices=["zero", "kaiming"], default=None,
                    help="A as built: zero (ReLoRA's code; B = A = 0 has no gradient, so the factors train from the "
                         "first merge on) or kaiming (LoRA's); default: zero if K > 0, else kaiming")


def run_name(args):
    return "lora" if args.relora_every == 0 and args.warm_start_steps == 0 else "relora"
# --- METHOD: end ---
args = parse_args(parser, METHOD, size)

# -----------------------------------------------------------------------------
# setup: processes, device, precision, the batch (micro-batches x accumulation x processes), steps, data

device, device_type, ddp, ddp_rank, ddp_world = setup_processes(args)
master = ddp_rank == 0  # only rank 0 prints and writes files
precision, param_dtype, autocast = setup_precision(args, device_type)  # pure bf16: the papers' runs
micro_batch, accum = setup_batch(args, device, device_type, ddp_world)
max_steps, warmup_steps, eval_every = setup_steps(args)
seq_len, tokens_per_step = args.seq_len, args.global_batch * args.seq_len
run = run_name(args)
out_dir, ckpt_path = output_paths(args, run)
# the training split (random windows, or documents: --sequences), the fixed validation set every method shares,
# the tokenizer's vocabulary size
tokens, val, vocab_size = load_data(args, master, ddp)

# -----------------------------------------------------------------------------
# model: the same initial weights for every method (same seed)

cfg = get_config(args.size, vocab_size)
torch.manual_seed(args.seed)
if args.dry_run:  # the plan needs shapes, not weights
    device = "meta"
model = new_model(cfg, args, device, param_dtype)

# -----------------------------------------------------------------------------
# --- METHOD: begin ---
# the method: a frozen W0 plus trainable B A in every attention/MLP matrix, merged and restarted every K steps (ReLoRA)


class LoRALinear(torch.nn.Module):
    """y = W0 x + B A dropout(x) alpha / r. W0 (m x n) is the linear layer's own weight, frozen: no gradient, no
    optimizer state. B (m x r) starts at 0 and A (r x n) at 0 (ReLoRA's code) or Kaiming-uniform, U(+-1/sqrt(n))
    (LoRA's), so the layer starts as W0 x. Dropout (training only) masks the input of the low-rank branch alone,
    as ReLoRA's lora_B(lora_A(lora_dropout(x))): W0 x always sees all of x."""

    def __init__(self, weight, r, alpha, dropout=0.0, a_init="kaiming"):
        super().__init__()
        m, n = weight.shape
        self.scale, self.dropout = alpha / r, dropout
        self.W0 = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.B = torch.nn.Parameter(torch.zeros(m, r))
        self.A = torch.nn.Parameter(torch.zeros(r, n))
        if a_init == "kaiming":
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init, as LoRA and ReLoRA

    def forward(self, x):
        linear = torch.nn.functional.linear
        h = torch.nn.functional.dropout(x, self.dropout, self.training)
        return linear(x, self.W0) + linear(linear(h, self.A) * self.scale, self.B)

    @torch.no_grad()
    def merge_and_reinit(self, generator):
        """W0 += B A alpha / r (the function is unchanged), then A is drawn again from `generator`, on the CPU so
        that every device and process draws the same numbers, and B = 0: the next B A starts from 0."""
        self.W0.add_((self.B.float() @ self.A.float() * self.scale).to(self.W0.dtype))
        A = torch.nn.init.kaiming_uniform_(torch.empty(self.A.shape), a=math.sqrt(5), generator=generator)
        self.A.copy_(A)
        self.B.zero_()


@torch.no_grad()
def prune_state(optimizer, params, mode, ratio, generator):
    """ReLoRA's partial optimizer reset (training_utils.optimizer_reset) of each Adam moment (exp_avg, exp_avg_sq)
    of each parameter. The step counter is kept, as ReLoRA does: the bias correction stays ~1, so a zeroed entry's
    next update is (1 - b1) / sqrt(1 - b2) = 3.2 times Adam's usual step, which the lr re-warm tempers.
    random: an entry is kept where a uniform draw in the moment's dtype exceeds `ratio` (ReLoRA: rand_like(t) >
    ratio). Ours comes from `generator`, seeded by (seed, step) and drawn on the CPU, so a resume and every DDP
    process draw the same; ReLoRA draws from the global RNG. In bf16 no draw exceeds 0.999 (the largest is 1 - 2^-8
    and 0.999 rounds to 1), so there ReLoRA's default reset, 0.999, zeroes every entry.
    magnitude: an entry is kept where |t| exceeds the `ratio` quantile of |t|, taken in fp32 and rounded to the
    moment's dtype, as ReLoRA: entries tied at the threshold (frequent in bf16) are zeroed too."""
    for p in params:
        state = optimizer.state.get(p, {})  # none before the factor's first step
        for t in (state[moment] for moment in ("exp_avg", "exp_avg_sq") if moment in state):
            if mode == "random":
                keep = torch.rand(t.shape, dtype=t.dtype, generator=generator).to(t.device) > ratio
            else:
                keep = t.abs() > torch.quantile(t.abs().flatten().float(), ratio).to(t.dtype)
            t.mul_(keep)


def set_phase(layers, optimizer, lora):
    """The warm start (lora False) trains every W0 at full rank, B (= 0) and A frozen; the low-rank phase freezes
    W0, frees its AdamW state (the memory the method saves) and trains B and A."""
    for layer in layers:
        layer.W0.requires_grad_(not lora)
        layer.B.requires_grad_(lora)
        layer.A.requires_grad_(lora)
        if lora:
            optimizer.state.pop(layer.W0, None)


def restarts_lr(i, steps, warmup, every, restart_warmup):
    """The lr multiplier of step i (from 0) of a run of `steps`: ReLoRA's cosine_restarts scheduler
    (training_utils.get_cosine_schedule_with_multiple_warmups). A linear warmup from 0 and a cosine down to
    min_lr_ratio at the end; from step `every` on, every `every` steps the lr falls to 0 and climbs linearly over
    `restart_warmup` steps to the value the cosine has at the end of the climb, then follows the cosine again.
    every = 0: no restarts, ReLoRA's plain cosine scheduler over the whole run."""
    def cosine(i):
        progress = (i - warmup) / max(1, steps - warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if i < warmup:
        return i / warmup
    since = i % every if every else i
    if every and i >= every and since < restart_warmup:
        return since / restart_warmup * cosine(i - since + restart_warmup)
    return cosine(i)


def relora_lr(step):
    """The lr of a ReLoRA step, the authors' two runs in one. The warm start is their full-rank run: a schedule over
    the whole run, stopped after N steps. The low-rank phase is their ReLoRA run, whose scheduler starts afresh
    over the remaining steps with its own warmup (the whole run's, if there is no warm start)."""
    if step < warm_start:
        return warm_start_lr * restarts_lr(step, max_steps, warmup_steps, 0, 0)
    return args.lr * restarts_lr(step - warm_start, max_steps - warm_start, switch_warmup if warm_start else
                                 warmup_steps, relora_every, restart_warmup)


def seed_dropout(module, inputs):
    """Dropout draws from the global RNG: seed it for each training micro-batch from that micro-batch's `seed` (the
    training loop's, set before the forward), so that a resumed run draws the same masks and N processes draw what
    one process accumulating N micro-batches would. 2**63 + keeps it apart from the batch's own draw."""
    if module.training:
        torch.manual_seed(2**63 + seed)


r, alpha = args.rank, args.alpha
if r >= min(cfg.n_embd, cfg.n_ff):
    sys.exit(f"error: --rank {r} must be below d_model {cfg.n_embd} to be low rank")
# ReLoRA's README 250M run: a quarter of the steps full rank, then a merge every quarter, a warmup of a tenth of it
relora_every = max_steps // 4 if args.relora_every is None else args.relora_every
warm_start = max_steps // 4 if args.warm_start_steps is None else args.warm_start_steps
restart_warmup = min(100, relora_every // 5) if args.restart_warmup is None else args.restart_warmup
switch_warmup = (relora_every or max_steps - warm_start) // 10 if args.switch_warmup is None else args.switch_warmup
if args.resume:  # a resume that extends --max-steps would change the periods derived from it: refuse, saying so
    saved = {}
    with contextlib.suppress(Exception):  # not a checkpoint of this repository: resume() refuses it below
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["config"]
    periods = {"--relora-every": ("relora_every", relora_every, args.relora_every),
               "--warm-start-steps": ("warm_start_steps", warm_start, args.warm_start_steps),
               "--restart-warmup": ("restart_warmup", restart_warmup, args.restart_warmup),
               "--switch-warmup": ("switch_warmup", switch_warmup, args.switch_warmup)}
    changed = [f"{flag} {value} (the checkpoint's {saved[key]})" for flag, (key, value, given) in periods.items()
               if given is None and key in saved and saved[key] != value]
    if changed:
        sys.exit(f"error: --resume with {max_steps} steps derives {', '.join(changed)}: these periods default to "
                 f"fractions of the run's steps; to extend the run, give the checkpoint's: "
                 + " ".join(f"{flag} {saved[key]}" for flag, (key, _, _) in periods.items() if key in saved))
warm_start_lr = args.warm_start_lr or args.lr / 2  # the README: "we use a larger LR during the ReLoRA stage"
# ReLoRA's script hard-codes dropout 0.1 and zeroes A; plain LoRA is Glentis et al.'s (no dropout, A Kaiming)
dropout = (0.1 if relora_every else 0.0) if args.lora_dropout is None else args.lora_dropout
a_init = args.a_init or ("zero" if relora_every else "kaiming")
if relora_every and restart_warmup >= relora_every:
    sys.exit(f"error: --restart-warmup {restart_warmup} must be below --relora-every {relora_every}")
low_warmup = ("--switch-warmup", switch_warmup) if warm_start else ("--warmup-steps", warmup_steps)
if relora_every and low_warmup[1] > relora_every:  # ReLoRA's scheduler asserts it: the first merge ends the warmup
    sys.exit(f"error: {low_warmup[0]} {low_warmup[1]} must be at most --relora-every {relora_every}")
if master and relora_every and warm_start + relora_every >= max_steps:
    print(f"warning: --warm-start-steps {warm_start} + --relora-every {relora_every} is not below the run's "
          f"{max_steps} steps: no merge will happen", file=sys.stderr)
if master and warm_start:  # the estimate printed below is the low-rank phase's
    full, low = (estimate_bytes(args.size, m, precision, {"rank": r}, cfg.vocab_size) for m in ("full", METHOD))
    extra = sum(full[k] - low[k] for k in ("grads_bytes", "optimizer_state_bytes"))
    print(f"warm start: the first {min(warm_start, max_steps):,} steps train W0 at full rank, with {extra / 2**20:,.1f}"
          f" MiB more of gradients and optimizer state than the low-rank phase (the peak memory is full rank's)")
layers = []
for name, linear in compressible_matrices(model):
    parent, child = name.rsplit(".", 1)
    layers.append(LoRALinear(linear.weight, r, alpha, dropout, a_init).to(device, param_dtype))  # W0 is already there
    setattr(model.get_submodule(parent), child, layers[-1])
if dropout:
    model.register_forward_pre_hook(seed_dropout)
# one AdamW over every parameter: a frozen one gets no gradient, so AdamW skips it and keeps no state for it
# fused: all parameters' updates in one kernel (CPU and CUDA), the default for-loop's numbers to an ulp, faster
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay, fused=True)
factors = [p for layer in layers for p in (layer.B, layer.A)]
lora_phase = True  # as built: W0 frozen; the loop sets the phase of each step (warm start: W0 trains instead)
hparams = {"lr": args.lr, "rank": r, "alpha": alpha, "relora_every": relora_every, "warm_start_steps": warm_start,
           "warm_start_lr": warm_start_lr, "switch_warmup": switch_warmup, "restart_warmup": restart_warmup,
           "prune": args.prune, "prune_ratio": args.prune_ratio, "lora_dropout": dropout, "a_init": a_init}
# --- METHOD: end ---

raw_model = model  # the module itself, for state_dict and memory accounting
n_flops = flops_per_token(raw_model, seq_len)
model = wrap_model(model, args, ddp, device, device_type)
if master:
    print_plan(run, args, METHOD, hparams, raw_model, n_flops, precision, device_type, ddp_world, tokens, val,
               micro_batch, accum, max_steps, warmup_steps, eval_every, out_dir)
if args.dry_run:
    sys.exit(0)
config = run_config(args, METHOD, precision, hparams, micro_batch, val, cfg)  # a resume must continue the same run
start_step, stats = resume(args, ckpt_path, device, config, raw_model, optimizer, max_steps)

# -----------------------------------------------------------------------------
# training loop

log = open_out_dir(out_dir, args.resume, start_step, master, ddp)  # rank 0 writes the files
catch_stop_signals()  # SIGTERM (a preemption) or Ctrl-C: a checkpoint after the current step, then exit
bar = progress_bar(run, args, start_step, max_steps, master)
last_log, record = (0.0, 0), {}
for step in bar:
    t0 = time.time()
    # the step that the timing skips is measured: its peak of live tensor bytes (not under torch.compile)
    tracker = track_peak(step == start_step and not args.compile, raw_model, optimizer)
    lr = lr_schedule(step, args.lr, warmup_steps, max_steps, args.min_lr_ratio)
    # --- METHOD: begin ---
    if (step >= warm_start) != lora_phase:  # a pure function of the step, so a resume lands in the right phase
        lora_phase = step >= warm_start
        set_phase(layers, optimizer, lora_phase)
        if ddp:  # DDP all-reduces the parameters that required grad when it was built: wrap the model anew
            model = ddp_wrap(model.module, device, device_type)
    if step == warm_start > 0:  # the switch; also a resume from a checkpoint taken before it, in the phase as built
        optimizer.state.clear()  # the authors' ReLoRA run loads the warm-started weights alone: a new AdamW for all
    if relora_every or warm_start:  # ReLoRA's schedules; plain LoRA keeps the benchmark's warmup-cosine
        lr = relora_lr(step)
    # --- METHOD: end ---
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        # batch offsets depend only on (seed, step, micro_step, process): the same for every method and on resume,
        # and N processes draw what one process with N times the accumulation would
        seed = args.seed * 10**9 + (step * accum + micro_step) * ddp_world + ddp_rank
        x, y = get_batch(tokens["train"], micro_batch, seq_len, seed)
        x, y = x.to(device), y.to(device)
        # under DDP, all-reduce the gradients only on the last micro-batch
        sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
        if step == start_step and micro_step == 0 and master:
            time_estimate(bar, args, device_type, time.time() - t0, accum * (max_steps - start_step))
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
    if step == max_steps - 1:  # the gradients alive at the optimizer step, counted once
        stats["grads_bytes"] = tensor_bytes(p.grad for p in raw_model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as they are used
    stop_peak(tracker, stats)
    method_log = {}  # what the method did in this step, if anything
    # --- METHOD: begin ---
    since = step - warm_start  # the low-rank steps before this one
    if relora_every and since >= relora_every and since % relora_every == 0:  # after the lr-0 step, as ReLoRA
        generator = torch.Generator().manual_seed(args.seed * 10**9 + step + 1)  # the same on every rank and resume
        for layer in layers:
            layer.merge_and_reinit(generator)
        prune_state(optimizer, factors, args.prune, args.prune_ratio, generator)
        method_log["merges"] = stats["merges"] = stats.get("merges", 0) + 1
    # --- METHOD: end ---
    # everything below is diagnostics: the loss, divergence, timing, evaluation, the log, checkpoints
    train_loss = mean_loss(loss_sum, accum, ddp, ddp_world, step)
    time_step(stats, step, start_step, t0, tokens_per_step, device, device_type)
    last = step == max_steps - 1
    record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": train_loss, "lr": lr, **method_log}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm.item()
    if (step + 1) % eval_every == 0 or last:
        record.update(evaluate(model, val, micro_batch, device, autocast))
        check_val(record, step)
    if master and ((step + 1) % args.log_every == 0 or "val_loss" in record or method_log):
        last_log = write_log(bar, log, record, stats, last_log)
    bar.set_postfix(loss=f"{train_loss:.3f}")
    stop = stop_signal(ddp, device)  # a stop signal to any process stops every process after this step
    if master and (last or stop or checkpoint_due(args, step)):
        save_checkpoint(ckpt_path, raw_model, optimizer, step, config, stats)
    if stop and not last:
        stop_run(stop, step, ckpt_path, ddp)

# -----------------------------------------------------------------------------
# results

if "val_loss" not in record:  # a resume of a finished run: evaluate its final weights
    record.update(evaluate(model, val, micro_batch, device, autocast))
if master:
    write_result(out_dir, run, args, METHOD, hparams, record, raw_model, optimizer, stats, n_flops, max_steps,
                 precision, device, device_type, ddp_world, micro_batch, accum)
finish(ddp)
