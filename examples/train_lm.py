"""Train a small byte-level FLASHLM on the Python standard library's own source files.

    python examples/train_lm.py                    # FLASH LM, a few minutes on a CPU
    python examples/train_lm.py --compare          # + a same-size Transformer++ baseline
    python examples/train_lm.py --check-backends   # same seed, backend "torch" vs "triton"
    python examples/train_lm.py --tiny --steps 2   # smoke test
    torchrun --nproc-per-node=2 examples/train_lm.py --context-parallel 2   # one sequence, 2 ranks

The text is every `*.py` under os.path.dirname(os.__file__) (site-packages excluded), read as
bytes (vocabulary 256), shuffled by file with a fixed seed, 95% train / 5% validation. Both
models of --compare see the same batches from the same seed. --check-backends needs CUDA or
the Triton interpreter (TRITON_INTERPRET=1, set here when there is no GPU; then the model is
tiny and the run short, because the interpreter executes kernels in Python).
"""
import argparse
import glob
import importlib.util
import math
import os
import random
import sys
import time

import torch

# flash_kernels is imported only inside the functions: importing it imports triton, and
# --check-backends must set TRITON_INTERPRET=1 before that happens on a machine without a GPU.
if importlib.util.find_spec("flash_kernels") is None:   # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from tqdm.auto import tqdm
except ImportError:       # tqdm is optional: fall back on plain iteration
    tqdm = None

VOCAB = 256
TINY = dict(d=32, depth=2, s=16, seq_len=64, chunk_size=16, batch_size=4, data_mb=0.2)
# the model --check-backends trains under the Triton interpreter (kernels executed in Python)
INTERPRETER_CHECK = dict(d=32, depth=2, s=16, seq_len=32, chunk_size=8, batch_size=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--depth", type=int, default=4, help="FLASH layers")
    p.add_argument("--s", type=int, default=128, help="shared z width (queries and keys)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--rel-pos", choices=["learned", "t5", "none"], default="learned")
    p.add_argument("--rope", action="store_true", help="RoPE on the FLASH roles")
    p.add_argument("--norm", choices=["scalenorm", "layernorm"], default="scalenorm")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--data-mb", type=float, default=8.0, help="megabytes of source text to load")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--sample", type=int, default=200, help="bytes to generate at the end (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: the cores the load average leaves idle, at least 1)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and data set (smoke test)")
    p.add_argument("--compare", action="store_true", help="also train a Transformer++ baseline")
    p.add_argument("--plot", default="train_lm_curves.png", help="PNG of the --compare curves")
    p.add_argument("--check-backends", action="store_true",
                   help="train with backend='torch' and 'triton' on one seed, compare the losses")
    p.add_argument("--check-steps", type=int, default=None,
                   help="steps of --check-backends (default: 3 under the interpreter, 20 on CUDA)")
    p.add_argument("--context-parallel", type=int, default=0, metavar="W",
                   help="under torchrun with W processes: every sequence split across the W "
                        "ranks (cp_group), then rank 0 trains the same model in one process "
                        "and prints both loss curves side by side")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.eval_every = min(args.eval_every, max(1, args.steps))
        args.eval_batches = 1
        args.sample = min(args.sample, 32)
    return args


# -- data --------------------------------------------------------------------------------------

def stdlib_sources():
    """Paths of the standard library's .py files (no third-party packages), sorted."""
    root = os.path.dirname(os.__file__)
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(p for p in paths if "site-packages" not in p and "dist-packages" not in p)


def load_corpus(max_bytes, seed=0):
    """(train, val) uint8 tensors: stdlib sources shuffled by file, cut at max_bytes, 95/5."""
    paths = stdlib_sources()
    random.Random(seed).shuffle(paths)
    parts, total = [], 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"\n\n".join(parts)[:int(max_bytes)]), dtype=torch.uint8)
    split = int(0.95 * len(data))
    return data[:split], data[split:]


def get_batch(data, batch_size, seq_len, generator, device):
    """batch_size random windows: inputs (B, T) and next-byte targets (B, T), int64."""
    starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
    window = torch.stack([data[i:i + seq_len + 1] for i in starts.tolist()]).long()
    return window[:, :-1].to(device), window[:, 1:].to(device)


# -- models ------------------------------------------------------------------------------------

def build_flash(args, backend=None, device=None):
    from flash_kernels.nn import FLASHLM
    torch.manual_seed(args.seed)
    model = FLASHLM(VOCAB, args.d, args.depth, s=args.s, chunk_size=args.chunk_size,
                    rel_pos=None if args.rel_pos == "none" else args.rel_pos, rope=args.rope,
                    norm=args.norm, backend=backend or args.backend)
    return model.to(device or args.device)


def build_baseline(args, flash_params):
    """A Transformer++ of width d whose depth makes its parameter count closest to FLASH's."""
    from baselines import TransformerPP
    best = None
    for depth in range(1, 4 * args.depth + 1):
        torch.manual_seed(args.seed)
        model = TransformerPP(VOCAB, args.d, depth)
        gap = abs(count_params(model) - flash_params)
        if best is None or gap < best[0]:
            best = (gap, depth)
    torch.manual_seed(args.seed)
    return TransformerPP(VOCAB, args.d, best[1]).to(args.device)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -- training ----------------------------------------------------------------------------------

def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model, val, args):
    gen = torch.Generator().manual_seed(args.seed + 1)          # the same batches every time
    losses = [model.loss(*get_batch(val, args.batch_size, args.seq_len, gen, args.device)).item()
              for _ in range(args.eval_batches)]
    return sum(losses) / len(losses)


def train(model, train_data, val_data, args, label, quiet=False):
    """AdamW (or SGD) with clipping; returns {"train": [loss per step], "val": [(step, loss)], "tok_s"}."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)              # same data order for every model
    history = {"train": [], "val": [], "tok_s": 0.0}
    tokens, elapsed = 0, 0.0
    steps = range(args.steps)
    bar = tqdm(steps, desc=label, dynamic_ncols=True, leave=True) if tqdm and not quiet else steps
    write = tqdm.write if tqdm else print
    for step in bar:
        x, y = get_batch(train_data, args.batch_size, args.seq_len, gen, args.device)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        tokens += x.numel()
        history["train"].append(loss.item())
        history["tok_s"] = tokens / elapsed
        if bar is not steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / elapsed:,.0f}")
        last = step + 1 == args.steps
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            val = evaluate(model, val_data, args)
            history["val"].append((step + 1, val))
            recent = history["train"][-args.eval_every:]
            if not quiet:
                write(f"{label} step {step + 1:5d} | train {sum(recent) / len(recent):.3f} | "
                      f"val {val:.3f} | {tokens / elapsed:,.0f} tok/s")
    return history


def print_side_by_side(flash_hist, base_hist, flash_params, base_params):
    print(f"\nFLASH {flash_params:,} params vs Transformer++ {base_params:,} params "
          f"(validation loss, nats/byte)")
    print(f"{'step':>6} | {'FLASH':>8} | {'Transformer++':>13}")
    for (step, a), (_, b) in zip(flash_hist["val"], base_hist["val"]):
        print(f"{step:>6} | {a:>8.3f} | {b:>13.3f}")
    print(f"tok/s  | {flash_hist['tok_s']:>8,.0f} | {base_hist['tok_s']:>13,.0f}")


def save_plot(flash_hist, base_hist, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib to get one)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for hist, name in ((flash_hist, "FLASH"), (base_hist, "Transformer++")):
        ax.plot(range(1, len(hist["train"]) + 1), hist["train"], alpha=0.3, label=f"{name} train")
        ax.plot(*zip(*hist["val"]), marker="o", label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


@torch.no_grad()
def sample_text(model, val_data, args):
    prompt = val_data[:64].long()[None].to(args.device)
    start = time.perf_counter()
    out = model.generate(prompt, args.sample, temperature=0.8, top_k=40,
                         generator=torch.Generator(device=args.device).manual_seed(args.seed))
    seconds = time.perf_counter() - start
    text = bytes(out[0, prompt.shape[1]:].tolist()).decode("utf-8", errors="replace")
    print(f"\nsample ({args.sample} bytes in {seconds:.2f} s, {args.sample / seconds:,.0f} tok/s "
          f"incremental decoding) after the prompt:\n"
          f"{bytes(prompt[0].tolist()).decode('utf-8', errors='replace')}|>>>{text}")


# -- backend agreement -------------------------------------------------------------------------

def strengthen_init(model, seed):
    """Redraw gamma ~ N(0, 1), beta and the relative biases ~ N(0, 0.5^2), the embedding ~ N(0, 0.3^2).

    At the paper's initialisation (gamma ~ N(0, 0.02^2), zero offsets and biases) the relu^2
    scores are ~1e-6, and with a 0.02-scaled tied embedding the logits start near uniform: the
    first losses sit at ln(256) whatever the attention computes, and a wrong kernel would go
    unnoticed. With O(1) scores and O(1) logits every attention term moves the loss.
    """
    from flash_kernels.nn import RelativePositionBias, ScaleOffset
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.embed.weight.copy_(0.3 * torch.randn(model.embed.weight.shape, generator=gen))
        for mod in model.modules():
            if isinstance(mod, ScaleOffset):
                mod.gamma.copy_(torch.randn(mod.gamma.shape, generator=gen))
                mod.beta.copy_(0.5 * torch.randn(mod.beta.shape, generator=gen))
            elif isinstance(mod, RelativePositionBias):
                mod.weight.copy_(0.5 * torch.randn(mod.weight.shape, generator=gen))
    return model


def backend_agreement(args, steps):
    """Train the same model from one seed with backend "torch" and "triton": loss per step each.

    Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
    before triton is imported) on a tiny model in float32. The attention parameters are drawn
    large (`strengthen_init`) so that the kernels matter to the losses.
    """
    args = argparse.Namespace(**vars(args))
    args.steps, args.eval_every, args.warmup = steps, 0, 1
    if not args.device.startswith("cuda"):
        for key, value in INTERPRETER_CHECK.items():
            setattr(args, key, value)
    train_data, val_data = load_corpus(min(args.data_mb, 0.2) * 2**20, args.seed)
    curves = {}
    for backend in ("torch", "triton"):
        model = strengthen_init(build_flash(args, backend=backend), args.seed)
        curves[backend] = train(model, train_data, val_data, args, backend, quiet=True)["train"]
    return curves["torch"], curves["triton"]


def run_check_backends(args):
    if not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            sys.exit("--check-backends without CUDA needs TRITON_INTERPRET=1 set before triton "
                     "is imported: run with TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
        print("no CUDA device: running the Triton kernels under the interpreter (TRITON_INTERPRET=1)")
    steps = args.check_steps or (20 if args.device.startswith("cuda") else 3)
    start = time.perf_counter()
    torch_losses, triton_losses = backend_agreement(args, steps)
    print(f"{'step':>4} | {'torch':>10} | {'triton':>10} | rel. diff")
    worst = 0.0
    for i, (a, b) in enumerate(zip(torch_losses, triton_losses)):
        rel = abs(a - b) / abs(a)
        worst = max(worst, rel)
        print(f"{i + 1:>4} | {a:>10.6f} | {b:>10.6f} | {rel:.2e}")
    print(f"max relative difference of the losses over {steps} steps: {worst:.2e} "
          f"({time.perf_counter() - start:.1f} s)")
    return worst


# -- context parallelism -------------------------------------------------------------------------

class ContextParallelLM(torch.nn.Module):
    """`model` seen by `train` as if it ran on whole sequences, while this rank runs only its
    slice [start, end) of every sequence, with cp_group (flash_kernels.context_parallel).

    loss(x, y): this rank's share sum of its tokens' cross-entropy / all tokens of the batch,
    carrying the whole batch's mean as its value (all-reduced), so `train` records the loss
    the single process would. Each parameter's gradient (a per-rank partial) is summed over
    the ranks as soon as backward has accumulated it, so clipping and the optimizer step see
    the whole-sequence gradient on every rank, and the replicas stay identical.
    """

    def __init__(self, model, group, start, end):
        super().__init__()
        self.model, self.group, self.start, self.end = model, group, start, end
        import torch.distributed as dist
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(
                lambda p: dist.all_reduce(p.grad, group=self.group))

    def loss(self, idx, targets):
        import torch.distributed as dist
        import torch.nn.functional as F
        logits = self.model(idx[:, self.start:self.end], cp_group=self.group, start=self.start)
        local = F.cross_entropy(logits.float().reshape(-1, VOCAB),
                                targets[:, self.start:self.end].reshape(-1),
                                reduction="sum") / targets.numel()
        whole = local.detach().clone()
        dist.all_reduce(whole, group=self.group)
        return local + (whole - local.detach())


def run_context_parallel(args):
    """`torchrun --nproc-per-node=W examples/train_lm.py --context-parallel W`: gloo on a CPU,
    NCCL on GPUs (one per rank). Every rank draws the same batches from the same seed and
    holds the bytes [r * L, (r + 1) * L) of each sequence (L = seq_len / W rounded up to whole
    chunks; the last rank holds the rest), so the losses equal the single-process run's up to
    float rounding: rank 0 trains that one afterwards and prints the two side by side."""
    import torch.distributed as dist
    if "RANK" not in os.environ:
        sys.exit(f"--context-parallel {args.context_parallel} runs under torchrun: "
                 f"torchrun --nproc-per-node={args.context_parallel} examples/train_lm.py "
                 f"--context-parallel {args.context_parallel}")
    cuda = args.device.startswith("cuda")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != args.context_parallel:
        sys.exit(f"--context-parallel {args.context_parallel} but torchrun started {world_size} "
                 f"processes")
    if not cuda:
        torch.set_num_threads(max(1, pick_threads(args.threads) // world_size))
    per_rank = -(-args.seq_len // world_size)
    per_rank = -(-per_rank // args.chunk_size) * args.chunk_size
    start = min(rank * per_rank, args.seq_len)
    end = min(start + per_rank, args.seq_len)
    args.sample, args.compare = 0, False
    train_data, val_data = load_corpus(args.data_mb * 2**20, args.seed)
    if rank == 0:
        print(f"context parallel over {world_size} ranks ({dist.get_backend()}): bytes "
              f"{[(min(r * per_rank, args.seq_len), min((r + 1) * per_rank, args.seq_len)) for r in range(world_size)]} "
              f"of every {args.seq_len}-byte sequence")
    model = ContextParallelLM(build_flash(args), dist.group.WORLD, start, end)
    parallel = train(model, train_data, val_data, args, f"CP rank {rank}", quiet=rank != 0)
    dist.barrier()
    if rank == 0:
        single = train(build_flash(args), train_data, val_data, args, "single process",
                       quiet=True)
        print(f"\n{'step':>5} | {'single process':>14} | {f'{world_size} ranks (CP)':>14} | rel. diff")
        worst = 0.0
        for step, (a, b) in enumerate(zip(single["train"], parallel["train"])):
            rel = abs(a - b) / abs(a)
            worst = max(worst, rel)
            print(f"{step + 1:>5} | {a:>14.6f} | {b:>14.6f} | {rel:.1e}")
        print(f"max relative difference of the training losses: {worst:.1e}; tok/s: single "
              f"{single['tok_s']:,.0f}, CP {parallel['tok_s']:,.0f} (whole sequences)")
    dist.destroy_process_group()


# -- main --------------------------------------------------------------------------------------

def pick_threads(requested):
    """CPU threads for torch: `requested`, or the cores other processes leave idle.

    On a shared machine, more threads than idle cores is far slower than fewer: each parallel
    region waits for a thread that is not running (measured here: 2 threads with one core busy
    elsewhere ran a training step 12x slower than 1 thread).
    """
    if requested > 0:
        return requested
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:                # no load average on this platform
        return cores
    return max(1, min(cores, int(os.cpu_count() - busy + 0.5)))


def main(argv=None):
    args = parse_args(argv)
    if args.check_backends:
        run_check_backends(args)
        return
    if args.context_parallel:
        run_context_parallel(args)
        return
    if args.device == "cpu":
        torch.set_num_threads(pick_threads(args.threads))
    train_data, val_data = load_corpus(args.data_mb * 2**20, args.seed)
    print(f"data: {len(train_data):,} train / {len(val_data):,} validation bytes of stdlib source")
    model = build_flash(args)
    flash_params = count_params(model)
    print(f"FLASHLM: d={args.d} depth={args.depth} s={args.s} C={args.chunk_size} "
          f"T={args.seq_len} batch={args.batch_size}, {flash_params:,} parameters, "
          f"backend={args.backend}, device={args.device}"
          + (f", CPU threads: {torch.get_num_threads()}" if args.device == "cpu" else ""))
    flash_hist = train(model, train_data, val_data, args, "FLASH")
    if args.sample:
        sample_text(model, val_data, args)
    if args.compare:
        baseline = build_baseline(args, flash_params)
        base_params = count_params(baseline)
        print(f"\nTransformer++: d={args.d} depth={len(baseline.blocks)}, {base_params:,} parameters")
        base_hist = train(baseline, train_data, val_data, args, "Transformer++")
        print_side_by_side(flash_hist, base_hist, flash_params, base_params)
        save_plot(flash_hist, base_hist, args.plot)


if __name__ == "__main__":
    main()
