"""LoFi (Xu et al., NeurIPS 2021, Sec. 3.1 / Fig. 1): a video encoder trained for temporal action
localization at low fidelity, in three stages of one program, every one trained by the one loop fit():

  --stage acp    (1) action-classification pre-training of the TSM encoder on trimmed clips
  --stage lofi   (2) encoder + G-TAD head end to end on the TAL loss at low fidelity (S, T, ST, C-LoFi)
  --stage head   (3) frozen encoder, full-fidelity features, a fresh G-TAD head, detections, mAP
  --stage extract  the encoder's (T, D) features of every video, for other heads (ActionFormer, OpenTAD, ...)
  --stage plan   training memory of every fidelity, and what fits; --stage detect: one video file

  bash train.sh  # the whole pipeline, synthetic, CPU
  torchrun --nproc_per_node=4 lofi.py --stage lofi --cycle long --overwrite  # after bash train.sh
"""
import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import evaluate
import gtad
import tsm

# Defaults per preset; a flag always wins. Stage-2 epochs are not in the paper (15: three lr halvings);
# stage 3 follows G-TAD. Tiny: stage 1 from scratch needs Adam (SGD: chance after 400 steps; tests/bench).
PRESETS = {
    "paper": dict(**data.GEOMETRY["paper"], batch_size=16, workers="cores",
                  acp_epochs=10, acp_lr=0.01, acp_optim="sgd", acp_batch_size=16, acp_workers="cores",
                  lofi_epochs=15, lofi_lr=0.1, lofi_optim="sgd", lofi_step=5,
                  head_epochs=10, head_lr=1e-3, head_step=5),
    "tiny": dict(**data.GEOMETRY["tiny"], batch_size=4, workers=2,
                 acp_epochs=60, acp_lr=1e-3, acp_optim="adam", acp_batch_size=16, acp_workers=0,
                 lofi_epochs=6, lofi_lr=1e-3, lofi_optim="adam", lofi_step=5,
                 head_epochs=20, head_lr=2e-3, head_step=15),
}
LR_GRID = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)  # paper Sec. 3.3: stage 3's lr search
PREEMPTED = 3  # the exit code after SIGTERM or SIGUSR1: saved, to --resume
SIGNALS = []  # caught by run(): every rank stops after the step (fit, extraction) in which any rank got one


def get_args(argv=None):
    """-> (args, inputs): the flags with every default resolved, and the input files they name."""
    p = data.Parser(prog="lofi.py", description=__doc__.split("\n")[0])
    pos, count, num, add = data.positive_int, data.nonnegative_int, data.positive_float, p.add_argument
    # stage and data
    add("--stage", required=True, choices=["acp", "lofi", "head", "extract", "plan", "detect"])
    add("--anno", help="ActivityNet/HACS annotation JSON (default: data/synth/anno.json)")
    add("--videos", help="folder of <id>.mp4 or v_<id>.mp4, mkv, webm, avi (default: beside --anno)")
    add("--store", help="a frame store from `python data.py prepare`, in place of --videos")
    add("--features", type=data.folder, help="head: a folder of (T, D) <id>.npy or v_<id>.npy, in place of an encoder")
    add("--out", help="run folder (default: runs/<stage>; runs/lofi_head for head)")
    add("--preset", choices=PRESETS, help="paper: ActivityNet on GPUs; tiny: CPU (default: paper if CUDA)")
    add("--snippets", type=pos, help="full-fidelity L (paper: 100)")
    add("--frames", type=pos, help="frames per snippet F (paper: 8)")
    add("--stride", type=pos, help="frame stride in a snippet (paper: 8)")
    add("--size", type=pos, help="full-fidelity frame side H = W (paper: 224)")
    add("--max-bad", type=data.fraction, default=0.1, help="stop past this fraction of bad videos")
    # model
    add("--depth", type=int, default=18, choices=[18, 34, 50], help="TSM-ResNet depth")
    add("--init", help="none | imagenet | PATH (TSM, torchvision or lofi weights); default: the last.pt of the "
        "stage before")
    # fidelity (stage 2)
    add("--fidelity", choices=["s", "t", "st", "full"], help="one configuration, not a cycle")
    add("--cycle", default="long", choices=["long", "short"], help="C-LoFi schedule (default long)")
    add("--c-l", type=pos, default=1, help="long cycle: epochs per configuration")
    add("--c-s", type=pos, default=16, help="short cycle: batches per configuration")
    # optimisation
    add("--epochs", type=pos, help="default: the preset's value for the stage")
    add("--batch-size", type=pos, help="global batch, split over ranks")
    add("--lr", type=num, help="default: the preset's value for the stage")
    add("--momentum", type=float, default=0.0, help="stage 2 SGD momentum in [0, 1) (paper: 0)")
    add("--workers", type=count, help="DataLoader workers per rank (paper: its cores)")
    add("--amp", action="store_true", help="bf16 autocast")
    add("--checkpoint-encoder", action="store_true", help="recompute encoder activations in backward")
    add("--freeze-bn", action="store_true", help="BatchNorm in eval mode (small batches per GPU)")
    # stage 3 and detect
    add("--nms-sigma", type=num, default=0.84, help="soft-NMS exp(-iou^2 / sigma)")
    add("--top-k", type=pos, default=100, help="proposals kept per video")
    add("--video-scores", help="CUHK-format video-level class scores")
    add("--lr-search", action="store_true", help="head: the paper's lr search")
    add("--bn-recal", type=count, default=0, help="head: BatchNorm re-estimated on N videos")
    add("--budget-gb", type=num, help="plan: memory per device to fit batches into")
    add("--feat-stride", type=pos, help="extract: frames from a snippet's start to the next (default: frames x stride)")
    add("--float16", action="store_true", help="extract: float16 files (half the bytes)")
    add("--subset", default="all", help="extract: one subset of --anno (default: all)")
    add("--video", help="detect: one video file")
    add("--run", help="detect: a stage-3 run folder")
    add("--resume", action="store_true", help="continue from <out>/last.pt")
    add("--overwrite", action="store_true", help="start the run in --out again")
    add("--save-every", type=count, default=0, help="also save every N steps (extract: its features.json, 100)")
    add("--seed", type=count, default=0)
    add("--max-steps", type=pos, help="stop each epoch after N steps (tests)")
    args = p.parse_args(argv)

    # Every default is resolved here, once: the preset's, unless a flag was given.
    args.preset = args.preset or ("paper" if torch.cuda.is_available() else "tiny")
    preset = PRESETS[args.preset]
    args.out = args.out or "runs/" + ("lofi_head" if args.stage == "head" else args.stage)
    stage = args.stage if args.stage in ("acp", "lofi", "head") else "lofi"
    for key in ("snippets", "frames", "stride", "size", "batch_size", "workers"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(f"acp_{key}", preset[key]) if stage == "acp" else preset[key])
    if args.workers == "cores":
        args.workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    args.epochs = args.epochs or preset[f"{stage}_epochs"]
    args.lr = args.lr or preset[f"{stage}_lr"]
    args.optim = preset.get(f"{stage}_optim", "adam")
    args.lr_step = preset.get(f"{stage}_step")  # acp: a cosine schedule instead
    if args.stage == "extract" and not args.store:  # (a store: T = --snippets)
        args.feat_stride = args.feat_stride or args.frames * args.stride
    return args, check_inputs(p, args)


def check_inputs(p, args):
    """The rules between flags; the files they name, read once, as `inputs`. A refusal is one line naming
    the flag and the reason, exit 2, before anything is written."""
    def need(ok, message):
        if not ok:
            p.error(message)
    inputs = argparse.Namespace(videos={}, store=None, init=None, video_scores=None)
    need(args.snippets >= (12 if args.stage == "lofi" else 3), f"--snippets {args.snippets}: G-TAD needs L >= 3, "
         "stage lofi at least 12 (T-LoFi runs L/4)")
    need(args.size >= 32, f"--size {args.size}: must be at least 32 (the encoder strides by 32)")
    need(0 <= args.momentum < 1, f"--momentum {args.momentum}: must be in [0, 1)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    need(args.batch_size % world == 0, f"--batch-size {args.batch_size}: not divisible by the world size {world}")
    if args.stage == "detect":
        need(args.video and Path(args.video).is_file(), f"--video {args.video}: no such file")
        need(Path(args.run or args.out, "last.pt").is_file(), f"--run {args.run}: no last.pt here")
    if args.stage in ("plan", "detect"):
        need(args.anno is None or Path(args.anno).is_file(), f"--anno {args.anno}: no such file")
        return inputs
    need(not (args.features or args.bn_recal) or args.stage == "head", "--features, --bn-recal: --stage head only")
    need(not (args.feat_stride or args.float16) or args.stage == "extract", "--feat-stride, --float16: --stage extract")
    need(not (args.store and args.feat_stride), "--feat-stride: a store holds --snippets snippets a video: --videos")
    need(sum(map(bool, (args.features, args.store, args.videos))) <= 1, "give one of --videos, --store and --features")
    if args.anno is None:
        args.anno = "data/synth/anno.json"
        need(Path(args.anno).is_file(), "--anno: none given, and no data/synth/anno.json: run bash train.sh first")
    need(Path(args.anno).is_file(), f"--anno {args.anno}: no such file")
    if not args.features and not args.store:
        args.videos = args.videos or str(Path(args.anno).parent / "videos")
        need(Path(args.videos).is_dir(), f"--videos {args.videos}: not a folder")
    if args.init is None:
        default = Path(args.out).parent / {"acp": "none", "lofi": "acp"}.get(args.stage, "lofi") / "last.pt"
        args.init = str(default) if default.is_file() else "none"
        if args.stage != "acp" and os.environ.get("RANK", "0") == "0":
            print(f"--init {args.init}" + ("" if default.is_file() else f" (no {default}: the encoder starts random)"))
    need(args.init in ("none", "imagenet") or Path(args.init).is_file(), f"--init {args.init}: no such checkpoint file")
    need(not args.video_scores or Path(args.video_scores).is_file(), f"--video-scores {args.video_scores}: no file")
    held = [n for n in ("last.pt", "log.jsonl") if Path(args.out, n).is_file()]
    epochs = re.findall(r'"epoch": (\d+)', Path(args.out, "log.jsonl").read_text()) if "log.jsonl" in held else []
    args.job = os.environ.get("TORCHELASTIC_RUN_ID")  # torchrun's (--standalone: a uuid): the same in a restart
    inputs.restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"  # (run() decides)
    inputs.held, inputs.occupied = held, f"--out {args.out}: holds a run ({', '.join(held)}, last logged epoch " \
        f"{(epochs or ['none'])[-1]}): --resume continues it, --overwrite starts it again"
    need(not (args.resume and args.overwrite), "give --resume or --overwrite, not both")
    need(not held or args.resume or args.overwrite or inputs.restart or args.stage == "extract", inputs.occupied)
    need(args.stage != "extract" or "last.pt" not in held, f"--out {args.out}: holds a run's last.pt: not for features")
    need(not args.resume or "last.pt" in held, f"--resume: no checkpoint at {args.out}/last.pt")
    try:
        inputs.videos = data.read_annotations(args.anno)[0]
        if args.store:
            inputs.store = data.FrameStore(args.store)
            why = inputs.store.matches(args.snippets, args.frames, args.stride, args.size)
            need(why is None, f"--store {args.store}: {why}")
        if args.init not in ("none", "imagenet"):
            inputs.init = load_checkpoint(args.init)
        if args.video_scores:
            inputs.video_scores = gtad.read_video_scores(args.video_scores)
    except ValueError as e:  # data.BadInput, and the score file's ValueError
        p.error(str(e))
    return inputs


# ---------------- distributed
def compute_init(args):
    """One process, or one rank of a torchrun job (RANK set): returns (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = next(dist.rendezvous("env://"))[0]  # torchrun's agent keeps it over restarts: a fresh prefix each
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    return rank, world, device


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*a, **k):
    if rank_world()[0] == 0:
        print(*a, **k, flush=True)


def progress(iterable, desc):
    """A tqdm bar on rank 0's terminal, none in a log file."""
    return tqdm(iterable, desc=desc, leave=False, disable=rank_world()[0] > 0 or not sys.stderr.isatty())


def agree(flags, reason, where=""):
    """Stop every rank if any failed (flags[0] > 0, on the device), naming each one's reason(), else the healthy
    ranks wait in their next collective (NCCL: 10 min); -> the largest signal any rank got (flags[1])."""
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    failed, stop = flags.tolist()  # the one host-device sync
    if failed:
        if not dist.is_initialized():
            raise SystemExit(where + reason())
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, reason())
        raise SystemExit(f"{where}stopped, a rank failed: " + "; ".join(f"rank {r}: {e}" for r, e in
                                                                       enumerate(reasons) if e))
    return int(stop)


def forward_step(it, loss_fn, step, device, where="", amp=contextlib.nullcontext(), signals=()):
    """The next batch of `it`, loss_fn(batch), and the signal any rank got (`signals` here). A failure on any rank
    (loading, forward, a non-finite loss) stops every rank before backward's all_reduce."""
    batch, loss, terms, error, phase = None, None, {}, None, ", loading"
    try:
        batch = next(it)
        phase = ""
        with amp:
            loss, terms = loss_fn(batch)
    except Exception as e:
        if not dist.is_initialized():
            raise
        error = f"step {step}{phase}: {type(e).__name__}: {e}"
    finite = error is None and torch.isfinite(loss.detach())  # a tensor: read only on failure
    failed = torch.ones((), device=device) if error else (~finite).float()
    stop = agree(torch.stack([failed, failed.new_full((), max(signals, default=0))]),
                 lambda: error or (None if finite else f"step {step}: FloatingPointError: non-finite loss"), where)
    return batch, loss, terms, stop


def ddp(net, device):
    """DDP without buffer broadcasts (fit broadcasts BatchNorm statistics at epoch ends)."""
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) \
        if dist.is_initialized() else net


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def preempted(signum, args, where):
    flag = " with --resume" if Path(args.out, "last.pt").is_file() else " with --overwrite" * (args.stage != "extract")
    print0(f"lofi.py: {signal.Signals(signum).name}: stopped {where}; the same command{flag} continues it",
           file=sys.stderr)
    return SystemExit(PREEMPTED)


# ---------------- checkpoints
def load_checkpoint(path):
    try:
        return tsm.read_checkpoint(path)
    except (OSError, ValueError) as e:
        raise data.BadInput(str(e)) from None


# ---------------- the training loop
def fit(args, name, model, opt, sched, sampler, load, loss_fn, device, parts=None, extra=None, keep=(), split=None,
        on_epoch=None):
    """The one training loop (every stage, the lr search): load(sampler, epoch) -> batches, loss_fn(batch, epoch,
    step) -> (total, {term: tensor}) summed on the device, read at the epoch's end. <out>/last.pt (epoch ends,
    --save-every steps, a signal) holds `parts` (name -> module), `extra`, optimizer, scheduler and position;
    --resume continues at its step if extra's `keep` entries match. A JSON line an epoch in <out>/log.jsonl,
    with what on_epoch(epoch, record) adds. parts None: nothing saved, resumed or logged (trial heads)."""
    rank, world = rank_world()
    path, extra = Path(args.out) / "last.pt", extra or {}
    start, first, partial = 0, 0, {}
    if parts is not None and args.resume:
        ck = load_checkpoint(path)
        if ck.get("stage") != name:
            raise data.BadInput(f"--resume: {path} is a '{ck.get('stage')}' checkpoint, not '{name}'")
        for key in keep:
            if ck.get(key) != extra[key]:
                raise data.BadInput(f"--resume: {path} ran with {key} {ck.get(key)}, not {extra[key]}")
        if ck["step"] and (ck["args"]["batch_size"], ck["world"]) != (args.batch_size, world):
            raise data.BadInput(f"--resume: {path} stopped inside an epoch with --batch-size "
                                f"{ck['args']['batch_size']} on {ck['world']} processes; resume it with the same, "
                                f"not {args.batch_size} on {world}")
        for key, module in parts.items():
            module.load_state_dict(ck[key])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, first, partial = ck["epoch"], ck["step"], ck["partial"] or {}
        print0(f"resumed from {path} at epoch {start}" + (f", step {first}" if first else ""))

    def save(epoch, step=0, sums=None):
        if split:
            split.flush(f"in epoch {epoch}" if step else f"in epoch {epoch - 1}")
        if rank == 0:
            state = dict(stage=name, **{k: m.state_dict() for k, m in parts.items()}, **extra,
                         optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, step=step, world=world,
                         args=vars(args), partial=step and {k: v.item() for k, v in sums.items()})
            try:  # a kill or a failed write keeps the last whole file
                data.atomic_save(path, lambda f: torch.save(state, f))
            except (OSError, RuntimeError) as e:  # (torch.save wraps a disk's OSError)
                raise data.BadInput(f"{path}: not written ({e.__context__ or e}); the previous one is intact") from None
    raw = model.module if isinstance(model, DDP) else model
    for epoch in range(start, args.epochs):
        t0 = time.time()
        skip = first if epoch == start else 0  # > 0: resumed inside this epoch
        sampler.set_epoch(epoch, skip)
        steps = min(sampler.steps, args.max_steps or sampler.steps)
        model.train()
        if args.freeze_bn:
            tsm.set_bn_eval(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sums = {k: torch.tensor(v, device=device) for k, v in partial.items()} if skip else {}
        it = iter(load(sampler, epoch))
        for step in progress(range(skip, steps), f"{name} {epoch}"):
            batch, loss, terms, stop = forward_step(it, lambda b: loss_fn(b, epoch, step), step, device,
                                                    f"{name} epoch {epoch}: ", autocast(args, device), SIGNALS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():  # on the device: no sync
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
            if split:
                split.pending += batch["replaced"]
            every = args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps
            if parts is not None and (stop or every):  # (the last step too: resumed, its epoch's end runs)
                save(epoch, step + 1, sums)
            if stop:
                raise preempted(stop, args, f"at epoch {epoch}, step {step + 1}")
        lr = opt.param_groups[0]["lr"]  # the lr this epoch ran with
        sched.step()
        if world > 1:  # rank 0's BatchNorm statistics everywhere
            for b in raw.buffers():
                dist.broadcast(b, 0)
        record = dict(stage=name, epoch=epoch, **{k: v.item() / steps for k, v in sums.items()}, lr=lr, steps=steps)
        if sampler.configs:
            record["fidelity"] = sorted({str(sampler.config_at(epoch, s)) for s in range(steps)})
        if parts is not None:
            save(epoch + 1)
        if on_epoch:
            on_epoch(epoch, record)
        if parts is not None:
            record.update(time=round(time.time() - t0, 2),
                          max_mem=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
            print0(json.dumps(record))
            if rank == 0:
                with open(Path(args.out) / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
    if stop := agree(torch.tensor([0, max(SIGNALS, default=0)], device=device), lambda: None):  # at an epoch's end
        raise preempted(stop, args, f"at epoch {args.epochs}, step 0")
    return raw


# ---------------- data
def videos_of(args, inputs, subset):
    """data.Split of a subset: the videos with a file (--features: a feature file), a record in <out> of the rest."""
    names = {n for p in Path(args.features).glob("*.npy") for n in (p.stem, p.stem.removeprefix("v_"))} \
        if args.features else inputs.store.ready if inputs.store else data.video_files(args.videos)
    return data.Split(inputs.videos, subset, names, args.features or args.store or args.videos, args.out,
                      args.max_bad, args.resume)


def fidelity_grid(args):
    """Full fidelity (Eq. 1) and the three LoFi configurations S, T, ST (Eq. 2-4)."""
    full = data.Fidelity(args.snippets, args.size, args.size)
    return full, data.c_lofi(full)


def tal_dataset(args, inputs, videos, feat_stride=None):
    return data.TALDataset(videos, inputs.store or args.videos, args.frames, args.stride, fidelity_grid(args)[0],
                           feat_stride)


def loader(dataset, sampler, args, device):
    """The one way videos or clips are loaded, in the batches of `sampler` (a data.Batches), by --workers
    processes started afresh each pass."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, worker_init_fn=data.worker_init,
                      collate_fn=data.collate, pin_memory=device.type == "cuda")


def in_order(args, split, device, dataset, rank=0, world=1, n=None):
    """A split's `dataset` (its first n) a video a batch in order, rank r its stride; a broken one's: the next."""
    batches = data.Batches(len(dataset) if n is None else n, 1, rank, world, train=False)
    for batch in progress(loader(dataset, batches, args, device), split.subset):
        split.pending += batch["replaced"]
        yield batch


def optimizer(args, params, adam_decay, momentum):
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=adam_decay) if args.optim == "adam" else \
        torch.optim.SGD(params, lr=args.lr, momentum=momentum, weight_decay=1e-4)


# ---------------- models
def build_encoder(args, inputs, frozen_on=None):
    """The encoder of --init; frozen_on a device: in eval mode there, the same on every rank, even random."""
    with torch.random.fork_rng(devices=[], enabled=frozen_on is not None):
        if frozen_on is not None:
            torch.manual_seed(args.seed)
        try:
            encoder, said = tsm.build_encoder(args.depth, args.init, inputs.init, args.checkpoint_encoder)
        except ValueError as e:  # weights of another model: named, not a traceback
            raise data.BadInput(str(e)) from None
    print0(said)
    return encoder.to(frozen_on, memory_format=torch.channels_last).eval() if frozen_on else encoder


# ---------------- stage 1: ACP
def stage_acp(args, inputs, rank, world, device):
    """Clip classification on the trimmed instances of --anno (Sec. 3.1: ACP on a pre-training set, ACP+ on the
    target's), with the held-out clips' accuracy an epoch."""
    train, val = videos_of(args, inputs, "training"), videos_of(args, inputs, "validation")
    classes = data.class_names(train.videos + val.videos)
    ds, val_ds = (data.ClipDataset(s.videos, inputs.store or args.videos, classes, args.frames, args.stride,
                                   size=(args.size, args.size), train=s is train, seed=args.seed) for s in (train, val))
    net = tsm.ClipNet(build_encoder(args, inputs), len(classes)).to(device, memory_format=torch.channels_last)
    model, per_rank = ddp(net, device), args.batch_size // world
    opt = optimizer(args, net.parameters(), adam_decay=1e-2, momentum=0.9)

    def load(sampler, epoch):
        ds.epoch = epoch  # this epoch's clip positions and augmentation
        return loader(ds, sampler, args, device)

    def loss(batch, epoch, step):
        ce = F.cross_entropy(model(batch["frames"].to(device)).float(), batch["labels"].to(device))
        return ce, {"loss": ce}

    @torch.no_grad()
    def accuracy(epoch, record):  # validation clip accuracy, ranks a stride each
        net.eval()
        right = torch.zeros(2, device=device)
        with autocast(args, device):
            for batch in loader(val_ds, data.Batches(len(val_ds), per_rank, rank, world, train=False), args, device):
                hit = net(batch["frames"].to(device)).argmax(1) == batch["labels"].to(device)  # (B,)
                right += torch.stack([hit.sum(), torch.tensor(len(hit), device=device)])
                val.pending += batch["replaced"]
        if world > 1:
            dist.all_reduce(right)
        val.flush("in the clip accuracy")
        record["val_acc"] = (right[0] / right[1].clamp(min=1)).item()
    fit(args, "acp", model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs),
        data.Batches(len(ds), per_rank, rank, world, args.seed), load, loss, device,
        parts=dict(encoder=net.encoder, classifier=net.fc), keep=("classes",), split=train, on_epoch=accuracy,
        extra=dict(encoder_cfg=asdict(net.encoder.cfg), classes=classes))


# ---------------- stage 2: LoFi
def stage_lofi(args, inputs, rank, world, device):
    """Encoder + G-TAD head on the TAL loss at low fidelity: one configuration (Eq. 2-4), or C-LoFi
    cycling S -> T -> ST (Sec. 3.2); full fidelity only as --fidelity full."""
    train = videos_of(args, inputs, "training")
    full, lofis = fidelity_grid(args)
    configs = {"s": lofis[:1], "t": lofis[1:2], "st": lofis[2:], "full": [full]}.get(args.fidelity, lofis)
    ds = tal_dataset(args, inputs, train.videos)
    encoder = build_encoder(args, inputs)
    net = tsm.LoFiNet(encoder, gtad.GTAD(gtad.GTADConfig(feat_dim=encoder.dim))).to(device)
    if device.type == "cuda":  # NHWC for the tensor cores
        encoder.to(memory_format=torch.channels_last)
    model = ddp(net, device)
    # Sec. 3.3: SGD, lr 0.1, momentum 0, weight decay 1e-4, lr x 0.5 every 5 epochs (tiny: AdamW).
    opt = optimizer(args, net.parameters(), adam_decay=1e-4, momentum=args.momentum)
    sampler = data.Batches(len(ds), args.batch_size // world, rank, world, args.seed, configs=configs,
                           cycle=args.cycle, c_l=args.c_l, c_s=args.c_s)

    def loss(batch, epoch, step):
        targets = gtad.batch_targets(batch["segments"], batch["fidelity"].L, device)  # at this batch's L
        out = model(batch["frames"].to(device, non_blocking=True))  # maps (B, L, L)
        terms = gtad.loss(out, *targets, generator=gtad.loss_generator(args.seed, epoch, step, rank, device))
        return terms["total"], terms
    schedule = dict(cycle=args.cycle, c_l=args.c_l, c_s=args.c_s, configs=[str(c) for c in configs])
    fit(args, "lofi", model, opt, torch.optim.lr_scheduler.StepLR(opt, args.lr_step, gamma=0.5), sampler,
        lambda s, epoch: loader(ds, s, args, device), loss, device, parts=dict(encoder=encoder, head=net.head),
        keep=("schedule",), split=train,
        extra=dict(encoder_cfg=asdict(encoder.cfg), head_cfg=asdict(net.head.cfg), schedule=schedule))


# ---------------- stage 3: head
@torch.no_grad()
def extract_features(args, inputs, encoder, split, rank, world, device, folder):
    """Features (T, D) of a split's videos as <folder>/v_<id>.npy, a video a step on each rank, longest first (a step's
    take alike): T = --snippets (stage 3, a store) or every snippet of the decoded video (--feat-stride: dense_indices),
    one encoder pass each. features.json: the layout, encoder, each video's frames and fps (or why it has no file),
    saved every --save-every (100) steps and at a stop or the end; missing_files.txt: --anno's videos without one."""
    folder, init = Path(folder), Path(args.init)
    stamp = [str(init.resolve()), init.stat().st_size, init.stat().st_mtime_ns] if init.is_file() else args.init
    layout = dict(feat_stride=args.feat_stride, num_frames=args.frames * args.stride, snippets=None if args.feat_stride
                  else args.snippets, dtype=["float32", "float16"][args.float16], source=["videos", "store"][
                  bool(args.store)], encoder=dict(init=stamp, stage=(inputs.init or {}).get("stage", args.init)),
                  **{k: getattr(args, k) for k in ("frames", "stride", "size", "depth", "bn_recal", "seed", "amp")})
    held = [None]  # the folder's index (gtad.open_features; stage 3's: its own, cleared at will), or why it is refused
    if rank == 0:
        try:
            held = [gtad.open_features(folder, layout, data.atomic_save, args.stage == "head" or args.overwrite,
                                       args.overwrite)]
        except (OSError, ValueError) as e:
            held = [str(e)]
    if world > 1:
        dist.broadcast_object_list(held, src=0)
    if isinstance(held := held[0], str):
        raise data.BadInput(held)
    done, broken = held["videos"], held["broken"]  # id -> frames, fps, duration, T; id -> why it has no file
    split.broken.update({v.id: dict(id=v.id, reason=broken[v.id]) for v in split.videos if v.id in broken})
    split.check()  # (--max-bad counts them too; --overwrite tries them again)
    todo = sorted((v for v in split.videos if v.id not in {**done, **broken}), key=lambda v: -v.duration)
    print0(f"{split.subset} features: {len(split.videos) - len(todo)} in {folder} already, {len(todo)} to extract")
    save = lambda: gtad.save_features(folder, held, inputs.videos, data.atomic_save)  # (on rank 0)

    def one(batch):  # -> (a finite stand-in loss, {id: its record}); None: this rank's are done
        if rank == 0 and step and step % (args.save_every or 100) == 0:
            save()  # (the steps before this one; an error stops every rank)
        if batch is None or batch["ids"][0] in done:  # (done: a stand-in for a broken one, or a replacement)
            return torch.zeros((), device=device), {}
        (n, fps), frames = batch["counts"][0], batch["frames"][0]  # unique (K, 3, H, W), or (L, F, 3, H, W)
        idx = data.dense_indices(n, args.frames, args.stride, args.feat_stride) if args.feat_stride else None
        pick = torch.from_numpy(np.searchsorted(np.unique(idx), idx)) if args.feat_stride else torch.arange(len(frames))
        x = torch.cat([tsm.encode(encoder, frames[pick[t:t + args.snippets]][None].to(device))[0]
                       for t in range(0, len(pick), args.snippets)]).cpu().numpy()  # (T, D)
        if not np.isfinite(x := x.astype(layout["dtype"])).all():
            raise data.BadInput(f"video {batch['ids'][0]}: its features are not finite in {layout['dtype']}")
        data.atomic_save(folder / f"v_{batch['ids'][0]}.npy", lambda f: np.save(f, x))  # (or a broken one's stand-in)
        return torch.zeros((), device=device), {batch["ids"][0]: dict(frames=n, fps=fps, duration=n / fps, T=len(x))}
    spare = [v for v in split.videos if v.id in done][:data.REPLACE_TRIES]  # after todo: broken ones' stand-ins
    ds = tal_dataset(args, inputs, todo + spare, args.feat_stride)
    it = chain(in_order(args, split, device, ds, rank, world, len(todo)), repeat(None))
    try:
        for step in range(max(1, -(-len(todo) // world))):  # rank 0's count (1+: RNG draws alike)
            new, stop = forward_step(it, one, step, device, f"{split.subset} features: ", autocast(args, device),
                                     SIGNALS)[2:]  # (a failure stops every rank; the files stay)
            parts = [new] * world
            if world > 1:
                dist.all_gather_object(parts, new)
            done.update({k: v for part in parts for k, v in part.items()})
            if stop:
                raise preempted(stop, args, f"extracting {split.subset} features")
        split.flush("while extracting features")  # (the broken ones, named: they have no file)
        broken.update({k: r["reason"] for k, r in split.broken.items() if k not in done})
    finally:  # (a stop, a failure: what is done is saved)
        if rank == 0:
            save()
    split.videos = [v for v in split.videos if v.id in done]
    if not split.videos:
        raise data.BadInput(f"no {split.subset} video of {args.anno} decodes in {args.store or args.videos}")


def train_head(args, feats, videos, lr, device, extra=None):
    """A fresh G-TAD head on the fixed (D, L) features of `videos`, batches sliced in memory, by
    G-TAD's recipe (Adam, weight decay 1e-4, lr x 0.1 after lr_step epochs). extra None: a trial head."""
    rank, world = rank_world()
    head = gtad.GTAD(gtad.GTADConfig(feat_dim=feats[videos[0].id].shape[0])).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    x = torch.stack([feats[v.id] for v in videos])  # (N, D, L)
    labels = gtad.batch_targets([data.normalised_segments(v) for v in videos], args.snippets, "cpu")
    model = ddp(head, device)

    def loss(idx, epoch, step):
        out = model(x[idx].to(device))
        terms = gtad.loss(out, *(t[idx].to(device) for t in labels),
                          generator=gtad.loss_generator(args.seed, epoch, step, rank, device))
        return terms["total"], terms
    fit(args, "head", model, opt, torch.optim.lr_scheduler.StepLR(opt, args.lr_step, gamma=0.1),
        data.Batches(len(videos), args.batch_size // world, rank, world, args.seed),
        lambda s, epoch: map(torch.tensor, s), loss, device,
        parts=None if extra is None else dict(head=head), extra=extra and dict(extra, head_cfg=asdict(head.cfg)))
    return head.eval()


def search_lr(args, feats, train, classes, device):
    """The paper's lr search (Sec. 3.3): average mAP on a seeded tenth of the *training* videos of heads
    (and a video classifier) trained on the other nine tenths. The validation subset is never used."""
    held = set(np.random.default_rng([args.seed, 10]).permutation(len(train))[:max(1, len(train) // 10)].tolist())
    dev, fit_on = ([v for i, v in enumerate(train) if (i in held) is side] for side in (True, False))
    gt = evaluate.as_ground_truth(dev)
    clf = gtad.train_video_classifier(feats, fit_on, classes, args.seed)
    scores = {}
    for lr in LR_GRID:
        results = gtad.detect_videos(train_head(args, feats, fit_on, lr, device), feats, dev, lambda v: (
            gtad.video_class_scores(clf, feats[v.id]), classes), args.nms_sigma, args.top_k)
        scores[lr] = evaluate.detection_map(gt, dict(results=results))[1] if any(results.values()) else 0.0
        print0(f"lr search: lr {lr:g} -> {100 * scores[lr]:.2f} average mAP on {len(dev)} held-out training videos")
    best = [max(scores, key=scores.get)]
    if dist.is_initialized():
        dist.broadcast_object_list(best, src=0)  # ranks agree even if their scores differ
    return best[0]


def stage_head(args, inputs, rank, world, device):
    """Frozen encoder -> full-fidelity features -> a fresh G-TAD head -> validation detections, mAP (both protocols)."""
    train, val = videos_of(args, inputs, "training"), videos_of(args, inputs, "validation")
    classes = data.class_names(train.videos + val.videos)
    encoder, folder = None, args.features or Path(args.out) / "features"
    if not args.features:
        encoder = build_encoder(args, inputs, frozen_on=device)
        if args.bn_recal:  # every rank the same videos: the statistics agree
            pick = np.random.default_rng([args.seed, 11]).permutation(len(train.videos))[:args.bn_recal]
            with autocast(args, device):
                tsm.recalibrate_bn(encoder, (b["frames"].flatten(0, 1).to(device) for b in in_order(
                    args, train, device, tal_dataset(args, inputs, [train.videos[i] for i in sorted(pick)]))))
            train.flush("while re-estimating BatchNorm")
        for split in (train, val):
            extract_features(args, inputs, encoder, split, rank, world, device, folder)
    try:
        feats = gtad.read_features(folder, train.videos + val.videos, args.snippets)
    except ValueError as e:
        raise data.BadInput(str(e)) from None
    if args.lr_search:
        args.lr = search_lr(args, feats, train.videos, classes, device)
        print0(f"lr search: stage 3 trains with lr {args.lr:g}")
    clf = gtad.train_video_classifier(feats, train.videos, classes, args.seed)
    head = train_head(args, feats, train.videos, args.lr, device, extra=dict(
        encoder=encoder and encoder.state_dict(), encoder_cfg=encoder and asdict(encoder.cfg),
        video_classifier=clf.state_dict(), classes=classes))
    if rank > 0:
        return
    out, table = Path(args.out), inputs.video_scores
    if not table:  # its own classes (for another head: --video-scores)
        table = {v.id: gtad.video_class_scores(clf, feats[v.id]) for v in val.videos}, classes
        gtad.write_video_scores(out / "video_scores.json", *table)
    if lacking := [v.id for v in val.videos if v.id not in table[0]]:
        raise data.BadInput(f"{args.video_scores}: no video-level scores for {len(lacking)} videos: {lacking[:5]}")
    results = gtad.detect_videos(head, feats, val.videos, lambda v: (table[0][v.id], table[1]), args.nms_sigma,
                                 args.top_k)
    with open(out / "detections.json", "w") as f:
        json.dump(dict(version="VERSION 1.3", results=results, external_data={}), f)
    metrics = evaluate.run_metrics(args.anno, out / "detections.json", out / "metrics.json")
    print0(" | ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k[-4:] in ("0.50", "0.75", "0.95", "-mAP")))
    if blocked := {evaluate.normalise_id(k) for k in [*val.missing, *val.broken]}:  # OpenTAD's: videos at hand
        average = evaluate.run_metrics(args.anno, out / "detections.json", out / "metrics_available.json",
                                       blocked=blocked)["average-mAP"]
        print0(f"average-mAP {100 * average:.2f} on the {len(val.videos)} of {val.total} validation videos with "
               f"features (OpenTAD's protocol; the official, above, counts the other {len(blocked)} as missed)")


def stage_extract(args, inputs, rank, world, device):
    """The frozen encoder's features of every video of --subset, for any head (README: ActionFormer, OpenTAD)."""
    subsets = sorted({v.subset for v in inputs.videos.values()}) if args.subset == "all" else [args.subset]
    splits, encoder = [videos_of(args, inputs, s) for s in subsets], build_encoder(args, inputs, frozen_on=device)
    for split in splits:  # (every subset's files counted first: --max-bad stops it now, not hours later)
        extract_features(args, inputs, encoder, split, rank, world, device, args.out)


# ---------------- utilities
def stage_plan(args):
    """Training memory per video of full, S, T and ST fidelity on this device; with --budget-gb, the batch
    that fits, with and without --checkpoint-encoder and --amp."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full, lofis = fidelity_grid(args)
    rows = tsm.memory_plan(args.depth, args.frames, zip(("full", "S", "T", "ST"), [full, *lofis]), device,
                           args.checkpoint_encoder, args.amp, args.budget_gb)
    print0(f"device {device}: the memory a video adds to a training step\n" + tsm.plan_table(rows))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "plan.json").write_text(json.dumps(rows, indent=1))
    return rows


def stage_detect(args):
    """Detections and a timeline picture for one video file, from a stage-3 run folder."""
    device, path = torch.device("cuda" if torch.cuda.is_available() else "cpu"), Path(args.run or args.out) / "last.pt"
    ck = load_checkpoint(path)
    if ck.get("stage") != "head" or ck.get("encoder") is None:
        raise data.BadInput(f"{path}: no encoder in it (not stage 3's, or a head on precomputed features)")
    encoder = tsm.build_encoder(init=str(path), ckpt=ck)[0].to(device).eval()
    head, clf = gtad.from_checkpoint(ck)
    vars(args).update({k: ck["args"][k] for k in ("snippets", "frames", "stride", "size", "amp")})  # as stage 3 ran
    full = fidelity_grid(args)[0]
    frames, n, fps = data.read_video(args.video, lambda n, _: data.snippet_indices(n, full.L, args.frames, args.stride),
                                     (full.H, full.W))  # (L, F, 3, H, W)
    duration = n / fps
    with torch.no_grad(), autocast(args, device):
        feat = tsm.snippet_features(encoder, torch.from_numpy(frames)[None].to(device))[0].float().cpu()  # (D, L)
    dets = gtad.detections_for(head.to(device), feat, duration, gtad.video_class_scores(clf, feat),
                               ck["classes"], args.nms_sigma, args.top_k)
    out = path.parent / f"detect_{Path(args.video).stem}"
    Path(f"{out}.json").write_text(json.dumps(dict(video=args.video, duration=duration, detections=dets)))
    evaluate.draw_timeline(f"{out}.png", duration, dets[:10], args.anno, Path(args.video).stem)
    print0(f"{len(dets)} detections -> {out}.json, {out}.png")
    return dets


def main(argv=None):
    """Bad input (a flag, a file, the data) ends in one line on stderr and exit code 2, not a traceback."""
    try:
        return run(*get_args(argv))
    except data.BadInput as e:
        print(f"lofi.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(args, inputs):
    if args.stage == "plan":
        return stage_plan(args)
    if args.stage == "detect":
        return stage_detect(args)
    rank, world, device = compute_init(args)
    out, lock = Path(args.out), None
    caught = {s: signal.signal(s, lambda n, _: SIGNALS.append(n)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = data.hold(out / "lock") if rank == 0 else None  # the job's: rank 0 holds it
        verdict = [None if lock or rank else f"--out {args.out}: another job is running in it (it holds "
                   f"{args.out}/lock)", args.resume, args.overwrite]
        if lock and inputs.restart and inputs.held:  # torchrun restarted a job: its own folder continues
            ran = None  # (none, or unreadable: not this job's)
            with contextlib.suppress(OSError, ValueError):
                ran = json.loads((out / "args.json").read_text()).get("job")
            if args.job not in (None, "none") and ran == args.job:  # ("none": torchrun without a run id)
                verdict[1:] = "last.pt" in inputs.held, "last.pt" not in inputs.held
            elif not (args.resume or args.overwrite):
                verdict[0] = inputs.occupied
        if world > 1:
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise data.BadInput(verdict[0])
        args.resume, args.overwrite = verdict[1:]
        if rank == 0:
            if not args.resume:  # a new run, or --overwrite (features stay: a keyed cache)
                for name in ("last.pt", "log.jsonl", "missing.txt"):
                    (out / name).unlink(missing_ok=True)
            data.atomic_save(out / "args.json", lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
        globals()[f"stage_{args.stage}"](args, inputs, rank, world, device)  # stage_acp, _lofi, _head, _extract
    finally:  # (as it was, for this process's next run)
        if lock:
            lock.close()
        for s, handler in caught.items():
            signal.signal(s, handler)
        SIGNALS.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
