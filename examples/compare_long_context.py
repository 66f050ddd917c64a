"""FLASH against Transformer++ and FLASH-Quad at long context: validation loss against wall-clock.

    python examples/compare_long_context.py                  # the CPU sweep: about an hour
    python examples/compare_long_context.py --preset gpu     # bf16, a larger model, 2 minutes
    python examples/compare_long_context.py --preset tiny    # seconds (a smoke test)
    python examples/publish_compare.py                       # commit a run: results and README

At every context length T, three language models with (nearly) the same parameter count train on
the byte corpus of examples/train_lm.py (the standard library's own source) from the same seed,
on the same batches, with the same tokens per step at every T (batch = tokens_per_step // T):

- FLASH: FLASHLM of FLASH layers, mixed chunk attention with C = min(chunk_size, T) (256, the
  paper's C, wherever T allows);
- Transformer++ (examples/baselines.py: RoPE, SwiGLU, RMSNorm, softmax attention through SDPA),
  its depth and FFN width matched to FLASH's parameter count (baselines.matching_config);
- FLASH-Quad: the paper's FLASH-Quad, the same stack of GAU layers with full quadratic
  attention, quad_scale = 1/T (the paper's 1/n) and a learned relative bias over offsets < C
  (farther offsets share the last weight), so that it has FLASH's parameters less the two
  roles it does not use. It is left out above --quad-max-len: its T x T scores (at T = 16384
  one (T, T) float32 tensor is 1 GiB, several per layer are kept for the backward) do not fit
  beside the rest on a 23 GiB machine, and one step would take minutes there.

Alternation (the machine may be shared): all models of a T live in one process and take turns,
one segment each (its steps up to its next evaluation), the order reversed every round, so a
change in the machine's load reaches every model alike. Each segment records its training
seconds and the 1-minute load average at its start and end; ms per step is the median of the
segments' means, with their minimum and maximum as the spread.

Wall-clock counts the training steps only (forward, backward, clipping, optimizer step; not
batch sampling nor evaluation). Evaluation, on the same fixed windows of the validation text for
every model: before the first step, every k steps, after the last, and for a model whose steps
are slow also after any step that ends 1.5 k times the fastest model's median step time after its
previous evaluation, so that a slow model's curve is not a straight chord over minutes.

Time cap (--time-cap F, 0 = none): a model stops when its training seconds reach F times what
the fastest model of its T needs for all N steps (projected from its steps so far): the
comparison is at equal wall-clock, and a model 25 times slower than the others would otherwise
spend the whole budget. A stopped model's learning rate has not finished its decay (its
schedule is for N steps); the table says which models stopped early.

--time-budget S (the GPU preset: 110 s) bounds the whole run's wall time, evaluation and
compilation included: each T gets an equal share of what is left, and its models stop when it is
spent. Results are appended after every T, so a run stopped from outside keeps the T's done.

Outputs, under --output-dir (default examples_out/, git-ignored): compare_long_context.jsonl
(one record per run, T and model; appended), and for the latest run compare_long_context.md
(tables), compare_long_context.txt (the same, narrow, as printed) and compare_long_context.png
(validation loss against seconds, a panel per T). examples/publish_compare.py copies a run into
examples/results/ and the README.

The CPU preset and its arithmetic. d = 128, depth 4, S = 128 (E = 2d): 499,717 parameters (the
model of examples/train_lm.py); 16,384 tokens per step (the least that holds one T = 16384
sequence); N = 60 steps, k = 10; one CPU thread (on a shared 2-core machine at load ~6 a second
thread mostly waits for a core: see train_lm.pick_threads). Seconds per step measured in the
published run (examples/results/, load 3.6-10.2, median 6.3):
    T          256    1024   4096   8192   16384
    FLASH      4.0    2.5    2.8    2.7    2.6
    T++        2.6    1.9    2.9    4.2    7.0
    FLASH-Quad 4.6    6.7    20.3   52.7   (not run)
With the time cap F = 2 a model stops at twice the fastest model's N-step time, so a T costs
about (its two fastest models' N steps) + (the slowest's min(N steps, 2 x the fastest's)):
    T = 256:   60 x 4.0 + 60 x 2.6 + 60 x 4.6          = 672 s
    T = 1024:  60 x 2.5 + 60 x 1.9 + 2 x 114 (37 steps) = 492 s
    T = 4096:  60 x 2.8 + 60 x 2.9 + 2 x 176 (18 steps) = 694 s
    T = 8192:  60 x 2.7 + 60 x 4.2 + 2 x 161 (7 steps)  = 736 s
    T = 16384: 60 x 2.6 + 2 x 145 (43 steps)           = 446 s
3,040 s of training, plus evaluation (a forward pass, about a third of a step, 7 times per model
and more for slow ones): the published run took 3,487 s (58 min). --steps trades length for
time linearly.
"""

import argparse
import gc
import hashlib
import importlib
import json
import os
import statistics
import sys
import time

import torch

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(EXAMPLES)
for _path in (REPO, EXAMPLES):  # flash_kernels and bench from a checkout; train_lm, ...
    if _path not in sys.path:
        sys.path.insert(0, _path)
# the sibling scripts, imported once the path holds their folder
compare_report = importlib.import_module("compare_report")
train_lm = importlib.import_module("train_lm")
VOCAB, count_params, get_batch = train_lm.VOCAB, train_lm.count_params, train_lm.get_batch

MODELS = ("FLASH", "Transformer++", "FLASH-Quad")
RESULTS_NAME = "compare_long_context.jsonl"

#: Every setting of a run; a preset gives them all, command-line options override one by one.
#: The CPU sweep's (see the module docstring for its arithmetic):
CPU_SWEEP = {
    "device": "cpu",
    "dtype": "float32",
    "threads": 1,
    "d": 128,
    "depth": 4,
    "s": 128,
    "chunk_size": 256,
    "seq_lens": [256, 1024, 4096, 8192, 16384],
    "tokens_per_step": 16384,
    "steps": 60,
    "eval_every": 10,
    "eval_tokens": None,
    "warmup": 10,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "data_mb": 8.0,
    "seed": 0,
    "time_cap": 2.0,
    "quad_max_len": 8192,
    "time_budget": 0.0,
    "backend": "auto",
    "models": list(MODELS),
}
#: bf16 autocast on a GPU: d = 512, E = 2d = 1024, S = 128 (FLASHLM's defaults: the paper's
#: shape), 8 layers (~13M parameters), T up to 8192; 110 s in all, compilation included.
GPU = dict(
    CPU_SWEEP,
    device="cuda",
    dtype="bfloat16",
    threads=0,
    d=512,
    depth=8,
    seq_lens=[1024, 4096, 8192],
    tokens_per_step=32768,
    steps=400,
    eval_every=25,
    warmup=40,
    lr=1e-3,
    time_budget=110.0,
)
PRESETS = {
    "cpu": CPU_SWEEP,
    "gpu": GPU,
    # the GPU preset's code path (bf16 autocast, a time budget) on a CPU at a tiny shape: what
    # bench/gpu_runbook.sh runs when there is no GPU (its dry run)
    "gpu-dry-run": dict(
        GPU,
        device="cpu",
        threads=1,
        d=32,
        depth=2,
        s=16,
        chunk_size=16,
        seq_lens=[32, 64],
        tokens_per_step=128,
        steps=6,
        eval_every=2,
        warmup=1,
        lr=3e-3,
        data_mb=0.1,
        quad_max_len=64,
        time_budget=60.0,
    ),
    "tiny": dict(
        CPU_SWEEP,
        d=16,
        depth=2,
        s=8,
        chunk_size=16,
        seq_lens=[16, 32],
        tokens_per_step=64,
        steps=4,
        eval_every=2,
        warmup=1,
        data_mb=0.05,
        quad_max_len=32,
    ),
}

SETTING_HELP = {
    "device": ("torch device", str),
    "dtype": ("float32, or bfloat16 (autocast; the parameters stay float32)", str),
    "threads": ("CPU threads of torch (0: leave torch's default)", int),
    "d": ("model width of every model", int),
    "depth": ("FLASH and FLASH-Quad layers (Transformer++: matched by parameters)", int),
    "s": ("shared z width S of the FLASH and GAU layers (E = 2d)", int),
    "chunk_size": ("FLASH chunk C, used as min(C, T)", int),
    "seq_lens": ("context lengths T", int),
    "tokens_per_step": ("tokens per training step at every T (batch = this // T)", int),
    "steps": ("training steps N per model and T", int),
    "eval_every": ("steps k between validation losses", int),
    "eval_tokens": ("validation tokens (default: tokens_per_step)", int),
    "warmup": ("linear warm-up steps of the learning rate", int),
    "lr": ("peak learning rate (warm-up, then cosine decay to 10%% at N steps)", float),
    "weight_decay": ("AdamW weight decay of the matrices", float),
    "data_mb": ("megabytes of standard-library source to load", float),
    "seed": ("seed of the weights and of the batches", int),
    "time_cap": (
        ("stop a model at this many times the fastest model's time for N steps (0: no cap)"),
        float,
    ),
    "quad_max_len": ("longest T at which FLASH-Quad (T x T scores) runs", int),
    "time_budget": (
        "seconds for the whole run, evaluation and compilation included (0: none)",
        float,
    ),
    "backend": ("attention backend of the FLASH and GAU layers", str),
    "models": ("models to train", str),
}


def parse_args(argv=None):
    """The settings: the preset's, with each option given on the command line replacing one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="the configuration (default: cpu, the hour-long CPU sweep)",
    )
    parser.add_argument(
        "--output-dir",
        default="examples_out",
        help="where the results, tables and figure go (default: examples_out)",
    )
    for name, (text, kind) in SETTING_HELP.items():
        option = "--" + name.replace("_", "-")
        if name in ("seq_lens", "models"):
            parser.add_argument(
                option,
                type=kind,
                nargs="+",
                default=None,
                choices=MODELS if name == "models" else None,
                help=f"{text} (default: the preset's)",
            )
        else:
            parser.add_argument(
                option, type=kind, default=None, help=f"{text} (default: the preset's)"
            )
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for name in SETTING_HELP:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["eval_tokens"] = settings["eval_tokens"] or settings["tokens_per_step"]
    for T in settings["seq_lens"]:
        if settings["tokens_per_step"] % T or settings["eval_tokens"] % T:
            parser.error(
                f"T = {T} does not divide tokens_per_step = "
                f"{settings['tokens_per_step']} and eval_tokens = "
                f"{settings['eval_tokens']}: every T must get whole sequences"
            )
    if settings["dtype"] not in ("float32", "bfloat16"):
        parser.error(f"--dtype must be float32 or bfloat16, got {settings['dtype']!r}")
    if settings["device"].startswith("cuda") and not torch.cuda.is_available():
        parser.error(
            f"the {args.preset!r} preset needs CUDA, and there is none here: "
            f"--preset gpu-dry-run runs its code path on the CPU"
        )
    return argparse.Namespace(preset=args.preset, output_dir=args.output_dir, **settings)


# -- models --------------------------------------------------------------------------------------


def build_models(args, T):
    """{name: (model, shape)} of the models run at T, each initialised from args.seed; shape
    describes its configuration (recorded). FLASH-Quad is absent above args.quad_max_len."""
    from baselines import TransformerPP, matching_config

    from flash_kernels.nn import FLASHLM

    chunk = min(args.chunk_size, T)
    torch.manual_seed(args.seed)
    flash = FLASHLM(VOCAB, args.d, args.depth, s=args.s, chunk_size=chunk, backend=args.backend)
    built = {
        "FLASH": (
            flash,
            {
                "layer": "flash",
                "depth": args.depth,
                "s": args.s,
                "e": 2 * args.d,
                "chunk_size": chunk,
            },
        )
    }
    if "Transformer++" in args.models:
        depth, hidden = matching_config(VOCAB, args.d, count_params(flash))
        torch.manual_seed(args.seed)
        baseline = TransformerPP(VOCAB, args.d, depth, ffn_hidden=hidden)
        built["Transformer++"] = (
            baseline,
            {"depth": depth, "heads": max(1, args.d // 64), "ffn_hidden": hidden},
        )
    if "FLASH-Quad" in args.models and T <= args.quad_max_len:
        torch.manual_seed(args.seed)
        quad = FLASHLM(
            VOCAB,
            args.d,
            args.depth,
            layer="gau",
            s=args.s,
            max_len=chunk,
            quad_scale=1.0 / T,
            backend=args.backend,
        )
        built["FLASH-Quad"] = (
            quad,
            {
                "layer": "gau",
                "depth": args.depth,
                "s": args.s,
                "e": 2 * args.d,
                "quad_scale": 1.0 / T,
                "bias_offsets": chunk,
            },
        )
    if "FLASH" not in args.models:
        del built["FLASH"]
    return {name: (model.to(args.device), shape) for name, (model, shape) in built.items()}


def load_average():
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class ModelRun:
    """One model's training at one T: its optimizer, its own batch generator (seeded alike for
    every model, so that all draw the same batches in the same order), a digest of the batches
    it trained on (to check that), and its log: training loss and seconds per step, the
    validation curve [(step, training seconds, loss)] and the timed segments."""

    def __init__(self, name, model, shape, args, T, train_data, val_data):
        self.name, self.model, self.shape, self.args, self.T = name, model, shape, args, T
        self.batch = args.tokens_per_step // T
        self.train_data, self.val_data = train_data, val_data
        self.opt = train_lm.make_optimizer(model, args)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.digest = hashlib.sha1()
        self.step, self.elapsed = 0, 0.0
        self.train_loss, self.step_seconds, self.curve, self.segments = [], [], [], []
        self.stopped = None
        self.cuda = args.device.startswith("cuda")

    def _loss(self, x, y):
        if self.args.dtype == "bfloat16":
            with torch.autocast(device_type="cuda" if self.cuda else "cpu", dtype=torch.bfloat16):
                return self.model.loss(x, y)
        return self.model.loss(x, y)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def warm_up(self):
        """One untimed forward and backward on a validation batch, gradients dropped (no
        optimizer step: the weights are untouched): compiles the GPU kernels before the clock
        starts."""
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        x, y = get_batch(self.val_data, self.batch, self.T, gen, self.args.device)
        self._loss(x, y).backward()
        self.model.zero_grad(set_to_none=True)
        self._sync()

    @torch.no_grad()
    def evaluate(self):
        """The mean loss over the fixed validation windows (the same for every model and every
        evaluation), appended to the curve at the current step and training seconds."""
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        losses, sequences = [], self.args.eval_tokens // self.T
        while sequences > 0:  # in batches of the training batch's size at most
            x, y = get_batch(
                self.val_data, min(self.batch, sequences), self.T, gen, self.args.device
            )
            losses.append((self._loss(x, y).item(), x.shape[0]))
            sequences -= x.shape[0]
        mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        self.curve.append((self.step, self.elapsed, mean))

    def train_step(self):
        x, y = get_batch(self.train_data, self.batch, self.T, self.gen, self.args.device)
        self.digest.update(x.cpu().numpy().tobytes())
        self._sync()
        start = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = train_lm.lr_at(self.step, self.args)
        loss = self._loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self._sync()
        seconds = time.perf_counter() - start
        self.step += 1
        self.elapsed += seconds
        self.step_seconds.append(seconds)
        self.train_loss.append(loss.item())

    def median_step(self):
        return statistics.median(self.step_seconds) if self.step_seconds else None


def time_cap(runs, args):
    """Training seconds at which a model stops: args.time_cap times the fastest model's
    projected time for all N steps (its seconds per step so far times N); None without a cap
    or before any model has stepped."""
    projections = [run.elapsed / run.step * args.steps for run in runs if run.step]
    if not args.time_cap or not projections:
        return None
    return args.time_cap * min(projections)


def stop_reason(run, runs, args, deadline):
    """Why `run` must stop now ("steps", "time cap", "time budget"), or None."""
    if run.step >= args.steps:
        return "steps"
    cap = time_cap(runs, args)
    if cap is not None and run.elapsed >= cap:
        return "time cap"
    if deadline is not None and time.perf_counter() >= deadline:
        return "time budget"
    return None


def evaluation_due(run, runs, args):
    """Every k steps; and after a step that ends 1.5 k times the fastest model's median step
    time after the previous evaluation (slow models: a point at least that often in seconds)."""
    if run.step % args.eval_every == 0:
        return True
    medians = [r.median_step() for r in runs if r.step_seconds]
    return run.elapsed - run.curve[-1][1] >= 1.5 * args.eval_every * min(medians)


def run_segment(run, runs, args, deadline):
    """Train `run` until its next evaluation or its stop, timed as one segment, then evaluate."""
    load_start, steps_before, seconds_before = load_average(), run.step, run.elapsed
    while True:
        run.stopped = stop_reason(run, runs, args, deadline)
        if run.stopped:
            break
        run.train_step()
        run.stopped = stop_reason(run, runs, args, deadline)
        if run.stopped or evaluation_due(run, runs, args):
            break
    if run.step > steps_before:
        run.segments.append(
            {
                "steps": run.step - steps_before,
                "seconds": run.elapsed - seconds_before,
                "load_start": load_start,
                "load_end": load_average(),
            }
        )
    if run.step > run.curve[-1][0]:
        run.evaluate()


def train_alternately(runs, args, deadline, report=print):
    """Every run evaluated before its first step, then segments in turn until all have stopped:
    the order of the first round is the given one (FLASH first, whose steps set the evaluation
    spacing and the time cap before the slower models start), then reversed every round."""
    for run in runs:
        if run.cuda:
            run.warm_up()
        run.evaluate()
    order = list(runs)
    while any(run.stopped is None for run in order):
        for run in order:
            if run.stopped is None:
                run_segment(run, runs, args, deadline)
                step, seconds, loss = run.curve[-1]
                load = run.segments[-1]["load_end"] if run.segments else "-"
                report(
                    f"  T={run.T:<6} {run.name:<13} step {step:>4} | {seconds:8.1f} s | "
                    f"val {loss:.3f} | load {load}"
                    + (f" | stopped: {run.stopped}" if run.stopped else "")
                )
        order.reverse()


# -- records -------------------------------------------------------------------------------------


def settings_record(args):
    return {name: getattr(args, name) for name in SETTING_HELP}


def run_record(run, meta, args, wall_s):
    """The JSON record of one model at one T (see compare_report for the fields' use)."""
    segment_ms = [1000 * seg["seconds"] / seg["steps"] for seg in run.segments]
    loads = [
        value
        for seg in run.segments
        for value in (seg["load_start"], seg["load_end"])
        if value is not None
    ]
    return dict(
        meta,
        status="ok",
        T=run.T,
        batch=run.batch,
        model=run.name,
        params=count_params(run.model),
        shape=run.shape,
        curve=[list(point) for point in run.curve],
        train_loss=run.train_loss,
        step_seconds=run.step_seconds,
        segments=run.segments,
        ms_per_step=statistics.median(segment_ms) if segment_ms else None,
        ms_min=min(segment_ms, default=None),
        ms_max=max(segment_ms, default=None),
        load_min=min(loads, default=None),
        load_max=max(loads, default=None),
        steps_run=run.step,
        stopped=run.stopped,
        batches_sha1=run.digest.hexdigest(),
        wall_s=wall_s,
    )


def skipped_record(name, T, meta, args, note):
    return dict(meta, status="skipped", T=T, batch=args.tokens_per_step // T, model=name, note=note)


def append_records(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)


def run_metadata(args):
    """Run id, time, device, versions and commit (bench.results_io), and this run's settings."""
    from bench.results_io import run_metadata as bench_metadata

    meta = bench_metadata(torch.device(args.device), getattr(torch, args.dtype), quick=False)
    meta.pop("quick", None)
    meta.update(
        preset=args.preset,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        settings=settings_record(args),
    )
    return meta


# -- main ----------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return sweep(args)
    finally:
        torch.set_num_threads(threads_before)


def sweep(args):
    """Every T in turn: build the models, train them alternately, append their records, redraw
    the run's tables and figure. Returns the run's records."""
    meta = run_metadata(args)
    results = os.path.join(args.output_dir, RESULTS_NAME)
    train_data, val_data = train_lm.load_corpus(args.data_mb * 2**20, args.seed)
    print(
        f"run {meta['run']}: preset {args.preset}, {meta['device']}, {args.dtype}, "
        f"{meta['threads']} thread(s), load {load_average()}; {len(train_data):,} train / "
        f"{len(val_data):,} validation bytes; {args.tokens_per_step:,} tokens per step, "
        f"N = {args.steps}, k = {args.eval_every}, time cap {args.time_cap or 'none'}"
    )
    start = time.perf_counter()
    end = start + args.time_budget if args.time_budget else None
    records = []
    for index, T in enumerate(args.seq_lens):
        t_start = time.perf_counter()
        deadline = None if end is None else t_start + (end - t_start) / (len(args.seq_lens) - index)
        built = build_models(args, T)
        runs = [
            ModelRun(name, model, shape, args, T, train_data, val_data)
            for name, (model, shape) in built.items()
        ]
        print(
            f"T = {T}: batch {args.tokens_per_step // T}; "
            + ", ".join(f"{run.name} {count_params(run.model):,} parameters" for run in runs)
        )
        train_alternately(runs, args, deadline)
        wall_s = time.perf_counter() - t_start
        block = [run_record(run, meta, args, wall_s) for run in runs]
        if "FLASH-Quad" in args.models and T > args.quad_max_len:
            block.append(
                skipped_record(
                    "FLASH-Quad",
                    T,
                    meta,
                    args,
                    f"T > quad_max_len = {args.quad_max_len} (its T x T attention scores)",
                )
            )
        append_records(results, block)
        records += block
        del runs, built
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        compare_report.write_run_report(records, args.output_dir)
    total = time.perf_counter() - start
    print(f"\n{compare_report.text_summary(records)}")
    print(
        f"total {total:.0f} s ({total / 60:.1f} min); records appended to {results}; tables "
        f"and figure: {os.path.join(args.output_dir, 'compare_long_context.{md,txt,png}')}"
    )
    return records


if __name__ == "__main__":
    main()
