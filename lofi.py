"""LoFi: low-fidelity end-to-end training of a video encoder for temporal action localization.

Implements Xu et al., "Low-Fidelity Video Encoder Optimization for Temporal Action
Localization" (NeurIPS 2021), Sec. 3.1 / Fig. 1, as three stages of one program:

  --stage acp    (1) action-classification pre-training of the TSM encoder on trimmed clips
  --stage lofi   (2) encoder + G-TAD head end to end on the TAL loss at low fidelity
                     (S-, T-, ST-LoFi, Eq. 2-4, or the C-LoFi cycle, Sec. 3.2)
  --stage head   (3) frozen encoder, full-fidelity features, a fresh G-TAD head, detections, mAP
and two utilities: --stage plan (training memory, speed and TFLOP/s of every fidelity) and --stage
detect (one video).

  torchrun --nproc_per_node=4 lofi.py --stage lofi --cycle long   # after bash train.sh: its data and stage 1
  python lofi.py --stage lofi --preset paper --anno A.json --videos DIR --out runs/lofi --init runs/acp/last.pt
  python lofi.py ... --store STORE                                  # frames from `python data.py prepare`
  python lofi.py --stage plan --preset tiny                         # needs no dataset
`bash train.sh` runs the whole pipeline on a synthetic dataset on a 2-core CPU in minutes. Over three
seeds (data and training) LoFi is ahead in every one: average mAP 53.7 +- 3.1 (baseline) vs 59.5 +- 4.7
(C-LoFi long), proposal AUC 76.5 +- 0.8 vs 83.8 +- 1.4 (README). Paper preset on one H200: S, T and
ST-LoFi each need 0.25 of the 19.4 GB a full-fidelity video takes to train.
Bad input (a flag, a file, an annotation) stops with one line and exit code 2; videos without a file
are skipped and videos that fail to decode are replaced, both with a record (README, "Dirty data").
"""
import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import evaluate
import gtad
import tsm

# Defaults per preset; an explicit flag always wins. The paper does not state the number of
# stage-2 epochs: 15 (three lr halvings) is our choice. Stage 3 follows G-TAD (10 epochs, lr x0.1
# at 5) with an lr from the paper's search set {2e-4 ... 5e-3}.
# Stage 1 from scratch on a hundred synthetic videos (tiny) needs Adam and ~500 steps of 16 clips to
# learn motion (SGD at lr 0.01-0.02 had not left chance after 400 steps; README). train.sh adds --amp
# to the tiny preset: bf16 runs TSM-R18 1.4x (training) to 2.5x (inference) faster than fp32 on CPUs
# with AVX512-BF16.
PRESETS = {
    "paper": dict(**data.GEOMETRY["paper"], batch_size=16, workers="cores", amp=False,
                  acp_epochs=10, acp_lr=0.01, acp_optim="sgd", acp_batch_size=16, acp_workers="cores",
                  lofi_epochs=15, lofi_lr=0.1, lofi_optim="sgd", lofi_step=5, lofi_momentum=0.0,
                  head_epochs=10, head_lr=1e-3, head_step=5),
    "tiny": dict(**data.GEOMETRY["tiny"], batch_size=4, workers=2, amp=False,
                 acp_epochs=60, acp_lr=1e-3, acp_optim="adam", acp_batch_size=16, acp_workers=0,
                 lofi_epochs=6, lofi_lr=1e-3, lofi_optim="adam", lofi_step=5, lofi_momentum=0.0,
                 head_epochs=20, head_lr=2e-3, head_step=15),
}


def get_args(argv=None):
    p = data.Parser(prog="lofi.py", description=__doc__.split("\n")[0])
    # stage and data
    p.add_argument("--stage", required=True, choices=["acp", "lofi", "head", "plan", "detect"])
    p.add_argument("--anno", help="ActivityNet/HACS-format annotation JSON (default: data/synth/anno.json, "
                   "the synthetic set bash train.sh makes)")
    p.add_argument("--videos", help="folder with <id>.mp4 or v_<id>.mp4 (mkv, webm, avi) (default: the "
                   "'videos' folder beside --anno)")
    p.add_argument("--store", help="a frame store from `python data.py prepare`, in place of --videos")
    p.add_argument("--features", help="head: folder of precomputed <id>.npy or v_<id>.npy (T, D) snippet "
                   "features, in place of an encoder and --videos")
    p.add_argument("--out", help="run folder: checkpoints, logs, features (default: runs/<stage>, and "
                   "runs/lofi_head for head, as train.sh lays them out)")
    p.add_argument("--preset", choices=PRESETS, help="paper: ActivityNet on GPUs; tiny: CPU (default: paper "
                   "when CUDA is available, else tiny)")
    p.add_argument("--snippets", type=int, help="full-fidelity L (paper: 100)")
    p.add_argument("--frames", type=int, help="frames per snippet F (paper: 8)")
    p.add_argument("--stride", type=int, help="frame stride inside a snippet (paper: 8, i.e. a 64-frame window)")
    p.add_argument("--size", type=int, help="full-fidelity frame side H = W (paper: 224)")
    p.add_argument("--max-bad", type=float, default=0.1, help="stop when more than this fraction of a split's "
                   "videos are missing or fail to decode (a wrong folder, not a few dead downloads)")
    # model
    p.add_argument("--depth", type=int, default=18, choices=[18, 34, 50], help="TSM-ResNet depth")
    p.add_argument("--init", help="none | imagenet | PATH (TSM release, torchvision or lofi checkpoint); default: "
                   "none for acp, <out>/../acp/last.pt for lofi, <out>/../lofi/last.pt for head, where they exist")
    # fidelity (stage 2)
    p.add_argument("--fidelity", choices=["s", "t", "st", "full"], help="one LoFi configuration (Eq. 2-4) instead "
                   "of a cycle; full: end to end at full fidelity, the upper bound that fits only at tiny scale")
    p.add_argument("--cycle", default="long", choices=["long", "short"], help="C-LoFi schedule (default long)")
    p.add_argument("--c-l", type=int, default=1, help="long cycle: epochs per configuration")
    p.add_argument("--c-s", type=int, default=16, help="short cycle: batches per configuration")
    # optimisation
    p.add_argument("--epochs", type=int, help="default: the preset's value for the stage")
    p.add_argument("--batch-size", type=int, help="global batch (videos or clips), split over ranks")
    p.add_argument("--lr", type=float, help="default: the preset's value for the stage")
    p.add_argument("--momentum", type=float, help="stage 2 SGD momentum (paper: 0; tiny uses AdamW)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (paper: the cores per local rank, "
                   "so 4 ranks on 16 cores decode with 16 processes, not 32)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast, no loss scaling needed "
                   "(train.sh turns it on for the tiny preset)")
    p.add_argument("--checkpoint-encoder", action="store_true", help="recompute encoder activations in backward")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode (small per-GPU batches)")
    # post-processing (stage 3, detect)
    p.add_argument("--nms-sigma", type=float, default=0.84, help="soft-NMS exp(-iou^2/sigma); paper 0.84, G-TAD 0.8")
    p.add_argument("--top-k", type=int, default=100, help="proposals kept per video")
    p.add_argument("--video-scores", help="CUHK-format video-level class scores instead of our classifier")
    p.add_argument("--lr-search", action="store_true", help="head: pick the lr from the paper's set "
                   "{2e-4 ... 5e-3} by average mAP on a held-out tenth of the training videos")
    p.add_argument("--bn-recal", type=int, default=0, help="head: re-estimate the encoder's BatchNorm statistics "
                   "at full fidelity on this many training videos first (0: keep stage 2's)")
    # utilities
    p.add_argument("--budget-gb", type=float, help="plan: memory per device to fit batches into")
    p.add_argument("--plan-snippets", type=int, help="plan: snippets run through the encoder (memory scales linearly)")
    p.add_argument("--video", help="detect: one video file")
    p.add_argument("--run", help="detect: a stage-3 run folder")
    # run control
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--save-every", type=int, default=0, help="acp, lofi: also write <out>/last.pt every N steps "
                   "inside an epoch (an ActivityNet epoch takes tens of minutes; 0: at epoch ends only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (tests, dry runs)")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "paper" if torch.cuda.is_available() else "tiny"
    preset = PRESETS[args.preset]
    if args.out is None:
        args.out = "runs/" + ("lofi_head" if args.stage == "head" else args.stage)
    if args.stage == "acp":          # clips are far smaller than videos; tiny ones decode faster in-process
        args.batch_size = preset["acp_batch_size"] if args.batch_size is None else args.batch_size
        args.workers = preset["acp_workers"] if args.workers is None else args.workers
    for key in ("snippets", "frames", "stride", "size", "batch_size", "workers", "amp"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.workers == "cores":
        args.workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if args.stage in ("acp", "lofi", "head"):
        for key in ("epochs", "lr"):
            if getattr(args, key) is None:
                setattr(args, key, preset[f"{args.stage}_{key}"])
        args.lr_step = preset[f"{args.stage}_step"] if args.stage != "acp" else None   # acp: cosine
    if args.momentum is None:
        args.momentum = preset["lofi_momentum"]
    validate(p, args)
    return args


def validate(p, args):
    """Every flag checked before any data is read: one line naming the flag and the reason, exit code 2."""
    def need(ok, flag, why):
        if not ok:
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {why}")
    for flag in ("--frames", "--stride", "--batch-size", "--epochs", "--c-l", "--c-s", "--top-k", "--max-steps",
                 "--plan-snippets"):
        value = getattr(args, flag[2:].replace("-", "_"))
        need(value is None or value >= 1, flag, "must be a positive integer")
    for flag in ("--workers", "--bn-recal", "--save-every", "--seed"):
        need(getattr(args, flag[2:].replace("-", "_")) >= 0, flag, "must be a non-negative integer")
    need(args.snippets >= (12 if args.stage == "lofi" else 3), "--snippets", "G-TAD needs L >= 3 snippets, "
         "and stage lofi's T-LoFi runs L/4 (so at least 12)")
    need(args.size >= 32, "--size", "must be at least 32 pixels (S-LoFi halves it; the encoder strides by 32)")
    for flag in ("--lr", "--nms-sigma", "--budget-gb"):
        value = getattr(args, flag[2:].replace("-", "_"))
        need(value is None or (np.isfinite(value) and value > 0), flag, "must be a positive number")
    need(0 <= args.momentum < 1, "--momentum", "must be in [0, 1)")
    need(0 <= args.max_bad <= 1, "--max-bad", "must be a fraction in [0, 1]")
    if args.stage == "detect":
        need(args.video and Path(args.video).is_file(), "--video", "no such video file (detect needs one)")
        need(Path(args.run or args.out, "last.pt").is_file(), "--run", "no last.pt of a stage-3 run in this folder")
        need(args.anno is None or Path(args.anno).is_file(), "--anno", "no such file")
        return
    if args.stage == "plan":
        return
    if args.features and args.stage != "head":
        p.error(f"--features: only --stage head trains on precomputed features, not --stage {args.stage}")
    if args.anno is None:
        args.anno = "data/synth/anno.json"
        need(Path(args.anno).is_file(), "--anno", "no annotation file given, and the default (the synthetic set "
             "of bash train.sh) does not exist: run bash train.sh, or give --anno and --videos")
    need(Path(args.anno).is_file(), "--anno", "no such file")
    try:
        data.read_annotations(args.anno)
    except data.BadInput as e:
        p.error(str(e))
    if sum(map(bool, (args.features, args.store, args.videos))) > 1:
        p.error("give one of --videos, --store and --features")
    if args.features:
        need(Path(args.features).is_dir(), "--features", "not a folder")
    elif args.store:
        try:
            why = frame_store(args.store).matches(args.snippets, args.frames, args.stride, args.size)
        except data.BadInput as e:
            p.error(str(e))
        need(why is None, "--store", why)
    else:
        args.videos = args.videos or str(Path(args.anno).parent / "videos")
        need(Path(args.videos).is_dir(), "--videos", "not a folder (give the folder of the video files)")
    need(args.video_scores is None or Path(args.video_scores).is_file(), "--video-scores", "no such file")
    if args.video_scores:
        try:
            gtad.read_video_scores(args.video_scores)
        except ValueError as e:
            p.error(str(e))
    if args.init is None:
        default = Path(args.out).parent / {"acp": "none", "lofi": "acp", "head": "lofi"}[args.stage] / "last.pt"
        args.init = str(default) if default.is_file() else "none"
        if args.stage != "acp" and os.environ.get("RANK", "0") == "0":
            print(f"--init {args.init}" + ("" if default.is_file() else f" (no {default}: the encoder starts random)"))
    if args.init not in ("none", "imagenet"):
        need(Path(args.init).is_file(), "--init", "no such checkpoint file")
        try:
            load_checkpoint(args.init)
        except data.BadInput as e:
            p.error(str(e))


# ----------------------------------------------------------------------------- distributed
def compute_init(args):
    """One process, or one rank of a torchrun job (RANK set): returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise data.BadInput(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank = 0
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    return rank, world, device


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **k):
    if is_rank0():
        print(*a, **k, flush=True)


def progress(iterable, desc, rank=0):
    """A tqdm bar on an interactive terminal (rank 0); in a log file, nothing: log_epoch's line says it."""
    return tqdm(iterable, desc=desc, leave=False, disable=rank > 0 or not sys.stderr.isatty())


def agree(error=None):
    """Every rank learns whether any rank failed at this point (error: this rank's reason, or None), and
    then all of them stop with the reasons. Without it, the healthy ranks wait in their next collective
    until the process group's timeout (NCCL: 10 minutes). Costs one 1-element all_reduce, so call it
    where every rank is at the same step."""
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag)
        if flag.item():
            reasons = [f"rank {r}: {e}" for r, e in enumerate(gather(error)) if e]
            raise SystemExit("stopped, a rank failed: " + "; ".join(reasons))
    elif error:
        raise SystemExit(error)


@contextlib.contextmanager
def shared_failure(where):
    """Runs the block; an exception in it (a loader error, a non-finite loss, out of memory) becomes this
    rank's reason in agree(), so every rank stops together instead of timing out. Every rank must reach
    the block's end with the same collectives done: a training step has two (batch, then forward and
    loss), since DDP's forward broadcasts BatchNorm buffers. A failure inside backward, amid DDP's
    gradient all-reduce, is beyond it: torchrun then ends the other ranks. In one process an error keeps
    its traceback; a non-finite loss stops with one line."""
    error = None
    try:
        yield
    except Exception as e:
        if not dist.is_initialized() and not isinstance(e, FloatingPointError):
            raise
        error = f"{where}: {type(e).__name__}: {e}"
    agree(error)


def gather(obj):
    """All ranks' python objects in a list (one element per rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- models
class LoFiNet(nn.Module):
    """The TAL model of Fig. 1: TSM encoder per snippet, then the G-TAD head over the L snippets."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, frames):                                        # (B, L, F, 3, H, W) uint8
        return self.head(snippet_features(self.encoder, frames))      # maps (B, L, L)


def snippet_features(encoder, frames):
    """Snippet features (B, D, L) of frames (B, L, F, 3, H, W) uint8, as every stage feeds the head.

    Each snippet's feature is layer-normalised without parameters: G-TAD has no normalisation of its
    own, and the scale of an encoder's features depends on how it was trained (ours reach hundreds
    after ACP from scratch), which saturates the head's sigmoids. The same rule holds in all stages.
    """
    B, L = frames.shape[:2]
    x = encoder(tsm.normalize(frames.flatten(0, 1))).float()         # (B*L, D)
    return F.layer_norm(x, x.shape[-1:]).view(B, L, -1).transpose(1, 2)   # (B, D, L)


def build_encoder(args):
    cfg = tsm.TSMConfig(depth=args.depth, checkpoint=args.checkpoint_encoder)
    if args.init == "imagenet":
        return tsm.imagenet_tsm(cfg)
    if args.init != "none":
        ck = load_checkpoint(args.init)
        if isinstance(ck, dict) and "encoder_cfg" in ck:                       # a lofi checkpoint knows its own depth
            cfg = tsm.TSMConfig(**{**ck["encoder_cfg"], "checkpoint": args.checkpoint_encoder})
        encoder = tsm.TSM(cfg)
        report = tsm.load_weights(encoder, args.init)
        print0(f"encoder from {args.init}: {len(report['loaded'])} tensors, ignored {report['ignored']}")
        return encoder
    return tsm.TSM(cfg)


def set_bn_eval(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def save_checkpoint(path, state):
    """Write then rename, so a killed run never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not Path(path).is_file():
        raise data.BadInput(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:             # truncated, not a torch file, or pickled code: all unusable
        why = (str(e).strip().splitlines() or [""])[0][:160]       # torch's weights_only text runs to pages
        raise data.BadInput(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {why})") from None


def log_event(args, record):
    if is_rank0():
        with open(Path(args.out) / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def log_epoch(args, record):
    print0(json.dumps(record))
    log_event(args, record)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def loader(dataset, batch_sampler, args, device, persistent=False):
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, worker_init_fn=data.worker_init,
                      collate_fn=getattr(dataset, "collate", None) or data.collate,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and args.workers > 0)


def load_split(args, subset):
    """The subset's videos that have a file (a feature file with --features), sorted by id, and the ids
    of those that do not. Those are skipped with a record: one line, and <out>/missing.txt (id, subset).
    Evaluation still counts them (their ground truth stays: misses, as in the official protocol)."""
    videos, _ = data.read_annotations(args.anno, subset=subset)
    if not videos:
        raise data.BadInput(f"{args.anno}: no videos in subset '{subset}'")
    if args.features:
        names = {p.stem for p in Path(args.features).glob("*.npy")}
        have = lambda vid: vid in names or f"v_{vid}" in names
    elif args.store:                                 # (the store's manifest says why each is not there)
        have = frame_store(args.store).ready().__contains__
    else:
        have = data.video_files(args.videos).__contains__
    present = [videos[k] for k in sorted(videos) if have(k)]
    missing = sorted(k for k in videos if not have(k))
    where = args.features or args.store or args.videos
    if missing:
        if is_rank0():                               # (a resumed run has written them already)
            listed = Path(args.out) / "missing.txt"
            known = set(listed.read_text().splitlines()) if listed.exists() else set()
            with open(listed, "a") as f:
                f.writelines(f"{vid}\t{subset}\n" for vid in missing if f"{vid}\t{subset}" not in known)
        print0(f"{len(missing)} of {len(videos)} {subset} videos have no file in {where}, skipped: "
               f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (all in {Path(args.out) / 'missing.txt'})")
        if len(missing) > args.max_bad * len(videos):
            raise data.BadInput(f"{len(missing)} of {len(videos)} {subset} videos have no file in {where}, more than "
                                f"--max-bad {args.max_bad:g} (wrong folder?); the first: {', '.join(missing[:5])}")
    if not present:
        raise data.BadInput(f"no {subset} video of {args.anno} has a file in {where}")
    return present, missing


class BadVideos:
    """The run's record of a split's videos that could not be used: missing files (load_split) and
    videos that failed to decode, which the datasets replaced (data.replacing). Each rank adds what its
    batches report; flush() (a collective: every rank calls it at the same point) prints the new ones in
    one line, writes each to log.jsonl (event, id, reason), and stops the run once missing + broken
    exceed --max-bad of the split."""

    def __init__(self, args, subset, total, missing=()):
        self.args, self.subset, self.total, self.missing = args, subset, total, list(missing)
        log = Path(args.out) / "log.jsonl"             # a resumed run: what it logged before is known
        events = [json.loads(line) for line in open(log)] if args.resume and log.exists() else []
        self.pending = []
        self.broken = {e["id"]: e for e in events if e.get("event") == "broken" and e.get("subset") == subset}

    def add(self, replaced):
        self.pending.extend(replaced)

    def flush(self, where="", collective=True):
        parts = gather(self.pending) if collective else [self.pending]
        self.pending = []
        new = {r["id"]: r for part in parts for r in part if r["id"] not in self.broken}
        if not new:
            return
        self.broken.update(new)
        for r in new.values():
            log_event(self.args, dict(event="broken", subset=self.subset, where=where, **r))
        print0(f"{len(new)} {self.subset} video(s) failed to decode {where} and were replaced or skipped: "
               + "; ".join(f"{r['id']} ({r['reason']})" for r in new.values()))
        bad = len(self.missing) + len(self.broken)
        if bad > self.args.max_bad * self.total:
            raise data.BadInput(f"{bad} of {self.total} {self.subset} videos are missing or broken, more than "
                                f"--max-bad {self.args.max_bad:g}: " + ", ".join(sorted(self.missing + list(self.broken))))


def fidelity_grid(args):
    """Full fidelity (Eq. 1) and the three LoFi configurations S, T, ST (Eq. 2-4)."""
    full = data.Fidelity(args.snippets, args.size, args.size)
    return full, data.c_lofi(full)


@functools.lru_cache(maxsize=None)
def frame_store(path):
    """The store at `path`, its manifest read once a run (38k lines for HACS): every split and dataset
    then sees the same videos, even while a `prepare` adds more."""
    return data.FrameStore(path)


def source(args):
    """Where frames come from: the frame store, else the video folder."""
    return frame_store(args.store) if args.store else args.videos


def tal_dataset(args, videos):
    return data.TALDataset(videos, source(args), args.frames, args.stride, full=fidelity_grid(args)[0])


def batch_targets(segments, L, device):
    """G-TAD labels for each video of a batch at this batch's temporal scale L."""
    start, end, iou = zip(*(gtad.targets(s, L) for s in segments))
    return torch.stack(start).to(device), torch.stack(end).to(device), torch.stack(iou).to(device)


def loss_generator(args, rank, epoch, step, device):
    """Seeded RNG of G-TAD's sampled regression loss: same draws on resume and in the parity test."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([args.seed, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


def resume_state(args, model_parts, optimizer, scheduler, schedule=None):
    """Restore a run from <out>/last.pt -> (epoch, step, partial): where to continue (step > 0 after a
    mid-epoch checkpoint, --save-every) and that epoch's loss sums so far."""
    path = Path(args.out) / "last.pt"
    if not args.resume:
        return 0, 0, None
    if not path.exists():
        raise data.BadInput(f"--resume: no checkpoint at {path}")
    ck = load_checkpoint(path)
    if ck["stage"] != args.stage:
        raise data.BadInput(f"--resume: {path} is a '{ck['stage']}' checkpoint, not '{args.stage}'")
    if schedule is not None and ck.get("schedule") != schedule:
        raise data.BadInput(f"--resume: {path} ran the fidelity schedule {ck.get('schedule')}, not {schedule}")
    for name, module in model_parts.items():
        module.load_state_dict(ck[name])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    step, world = ck.get("step", 0), dist.get_world_size() if dist.is_initialized() else 1
    if step and (ck["args"]["batch_size"], ck.get("world")) != (args.batch_size, world):
        raise data.BadInput(f"--resume: {path} stopped inside an epoch with --batch-size {ck['args']['batch_size']} on "
                            f"{ck.get('world')} processes; resume it with the same, not {args.batch_size} on {world}")
    print0(f"resumed from {path} at epoch {ck['epoch']}" + (f", step {step}" if step else ""))
    return ck["epoch"], step, ck.get("partial")


# ----------------------------------------------------------------------------- stage 1: ACP
class ClipNet(nn.Module):
    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.fc = encoder, nn.Linear(encoder.dim, num_classes)
        # A zero classifier starts every clip at the uniform prediction: first loss ln K, whatever the
        # scale of the encoder's features (hundreds from scratch: an initial loss of 3.5 for K = 3).
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, frames):                                        # (B, F, 3, H, W) uint8
        return self.fc(self.encoder(tsm.normalize(frames)))           # (B, K)


def stage_acp(args, rank, world, device):
    train, missing = load_split(args, "training")
    val, val_missing = load_split(args, "validation")
    bad, val_bad = BadVideos(args, "training", len(train) + len(missing), missing), \
        BadVideos(args, "validation", len(val) + len(val_missing), val_missing)
    classes = data.class_names(train + val)
    size = (args.size, args.size)
    ds = data.ClipDataset(train, source(args), classes, args.frames, args.stride, size=size, train=True, seed=args.seed)
    val_ds = data.ClipDataset(val, source(args), classes, args.frames, args.stride, size=size, train=False, seed=args.seed)
    net = ClipNet(build_encoder(args), len(classes)).to(device, memory_format=torch.channels_last)
    model = DDP(net) if world > 1 else net
    if PRESETS[args.preset]["acp_optim"] == "adam":
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start, skip, partial = resume_state(args, {"encoder": net.encoder, "classifier": net.fc}, opt, sched)
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    per_rank = args.batch_size // world
    batches = torch.utils.data.BatchSampler(sampler, per_rank, drop_last=True)

    def save(epoch, step=0, partial=None):
        if rank == 0:
            save_checkpoint(Path(args.out) / "last.pt", dict(
                stage="acp", encoder=net.encoder.state_dict(), encoder_cfg=asdict(net.encoder.cfg),
                classifier=net.fc.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                epoch=epoch, step=step, partial=partial, world=world, classes=classes, args=vars(args)))
    for epoch in range(start, args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        model.train()
        if args.freeze_bn:
            set_bn_eval(net)
        first = skip if epoch == start else 0                     # > 0: resumed inside this epoch
        losses = list(partial["losses"]) if first else []
        steps = min(len(batches), args.max_steps or len(batches))
        it = iter(progress(loader(ds, list(batches)[first:steps], args, device), f"acp {epoch}", rank))
        for step in range(first, steps):
            with shared_failure(f"acp epoch {epoch} step {step}, loading"):
                frames, labels, replaced = next(it)
            with shared_failure(f"acp epoch {epoch} step {step}"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    loss = F.cross_entropy(model(frames.to(device, non_blocking=True)).float(), labels.to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bad.add(replaced)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
                bad.flush(f"in epoch {epoch}")
                save(epoch, step + 1, dict(losses=losses))
        bad.flush(f"in epoch {epoch}")
        lr = opt.param_groups[0]["lr"]           # the lr this epoch ran with
        sched.step()
        # Clip accuracy on the validation subset, each rank a disjoint stride of it (no padding).
        net.eval()
        shard = torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world))
        right = torch.zeros(2, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            for frames, labels, replaced in DataLoader(shard, batch_size=per_rank, num_workers=args.workers,
                                                       collate_fn=val_ds.collate, worker_init_fn=data.worker_init):
                pred = net(frames.to(device)).argmax(1).cpu()
                right += torch.tensor([(pred == labels).sum().item(), len(labels)], device=device)
                val_bad.add(replaced)                 # (a replacement clip is another valid clip: it counts)
        if world > 1:
            dist.all_reduce(right)
        val_bad.flush("in the clip accuracy")
        save(epoch + 1)
        log_epoch(args, dict(stage="acp", epoch=epoch, loss=float(np.mean(losses)) if losses else None,
                             val_acc=(right[0] / right[1].clamp(min=1)).item(), lr=lr,
                             time=round(time.time() - t0, 2), max_mem=peak_memory(device)))
    if rank == 0:
        write_video_scores(args, net, val, classes, device, val_bad)


def full_fidelity(args, videos, device, bad, desc, rank=0, per_rank=1):
    """Batches of `videos` at full fidelity, in order (the bar on rank 0 only). A broken video's place
    goes to the next one (a duplicate the callers skip or overwrite), and `bad` records it."""
    full, _ = fidelity_grid(args)
    batches = [[(i, full) for i in range(k, min(k + per_rank, len(videos)))] for k in range(0, len(videos), per_rank)]
    for batch in progress(loader(tal_dataset(args, videos), batches, args, device), desc, rank):
        bad.add(batch["replaced"])
        yield batch


@torch.no_grad()
def write_video_scores(args, net, videos, classes, device, bad):
    """<out>/video_scores.json: the stage-1 classifier's class scores of each video (softmax averaged over
    its full-fidelity snippets) in the CUHK format of --video-scores. G-TAD and the paper take their
    class labels from such a separate video classifier, so stage 3 on any encoder (baseline or LoFi)
    assigns the same classes and the comparison measures localization alone."""
    net.eval()
    results = {}
    for batch in full_fidelity(args, videos, device, bad, "video scores"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = net(batch["frames"][0].to(device)).float()                             # (L, K)
        results[batch["ids"][0]] = logits.softmax(1).mean(0).tolist()                        # (K,)
    bad.flush("while scoring videos", collective=False)
    path = Path(args.out) / "video_scores.json"
    path.write_text(json.dumps({"results": results, "class": classes}))
    print0(f"video-level class scores of {len(results)} validation videos -> {path}")


# ----------------------------------------------------------------------------- stage 2: LoFi
def stage_lofi(args, rank, world, device):
    train, missing = load_split(args, "training")
    bad = BadVideos(args, "training", len(train) + len(missing), missing)
    full, lofis = fidelity_grid(args)
    # Sec. 3.2: one configuration, or C-LoFi cycling S -> T -> ST; full fidelity is never used here.
    configs = {"s": lofis[:1], "t": lofis[1:2], "st": lofis[2:], "full": [full]}.get(args.fidelity, lofis)
    ds = tal_dataset(args, train)
    encoder = build_encoder(args)
    net = LoFiNet(encoder, gtad.GTAD(gtad.GTADConfig(feat_dim=encoder.dim))).to(device)
    if device.type == "cuda":    # NHWC convolutions for the tensor cores (on CPU kept as the README measured it)
        encoder.to(memory_format=torch.channels_last)
    model = DDP(net) if world > 1 else net
    # Sec. 3.3: SGD, lr 0.1, momentum 0, weight decay 1e-4, lr x 0.5 every 5 epochs.
    if PRESETS[args.preset]["lofi_optim"] == "adam":     # tiny: ~150 steps, where SGD barely moves the head
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, args.lr_step, gamma=0.5)
    schedule = dict(cycle=args.cycle, c_l=args.c_l, c_s=args.c_s, configs=[str(c) for c in configs])
    start, skip, partial = resume_state(args, {"encoder": net.encoder, "head": net.head}, opt, sched, schedule)
    sampler = data.FidelityBatchSampler(len(ds), args.batch_size // world, configs, args.cycle, c_l=args.c_l,
                                        c_s=args.c_s, rank=rank, world_size=world, seed=args.seed)
    # Workers persist across epochs (the sampler, not the dataset, carries the epoch): their start-up
    # (a copy of the dataset each) is paid once.
    batches = loader(ds, sampler, args, device, persistent=True)

    def save(epoch, step=0, partial=None):
        if rank == 0:
            save_checkpoint(Path(args.out) / "last.pt", dict(
                stage="lofi", encoder=net.encoder.state_dict(), encoder_cfg=asdict(net.encoder.cfg),
                head=net.head.state_dict(), head_cfg=asdict(net.head.cfg), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), epoch=epoch, step=step, partial=partial, world=world, args=vars(args),
                schedule=schedule))
    for epoch in range(start, args.epochs):
        t0 = time.time()
        first = skip if epoch == start else 0                     # > 0: resumed inside this epoch
        sampler.set_epoch(epoch, first)
        model.train()
        if args.freeze_bn:
            set_bn_eval(net)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sums, seen = (dict(partial["sums"]), list(partial["seen"])) if first else ({}, [])
        steps = min(sampler.steps, args.max_steps or sampler.steps)
        it = iter(progress(batches, f"lofi {epoch}", rank))
        for step in range(first, steps):
            with shared_failure(f"lofi epoch {epoch} step {step}, loading"):
                batch = next(it)
                fid = batch["fidelity"]
                start_t, end_t, iou = batch_targets(batch["segments"], fid.L, device)
            with shared_failure(f"lofi epoch {epoch} step {step}"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    out = model(batch["frames"].to(device, non_blocking=True))    # maps (B, L, L)
                losses = gtad.loss(out, start_t, end_t, iou, generator=loss_generator(args, rank, epoch, step, device))
                if not torch.isfinite(losses["total"]):
                    raise FloatingPointError(f"non-finite loss, videos {batch['ids']}")
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            seen.append(str(fid))
            bad.add(batch["replaced"])
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
                bad.flush(f"in epoch {epoch}")
                save(epoch, step + 1, dict(sums=sums, seen=seen))
        bad.flush(f"in epoch {epoch}")
        lr = opt.param_groups[0]["lr"]           # the lr this epoch ran with
        sched.step()
        save(epoch + 1)
        log_epoch(args, dict(stage="lofi", epoch=epoch, **{k: v / max(len(seen), 1) for k, v in sums.items()},
                             lr=lr, fidelity=sorted(set(seen)), steps=len(seen),
                             time=round(time.time() - t0, 2), max_mem=peak_memory(device)))


# ----------------------------------------------------------------------------- stage 3: head
SHARD_VIDEOS = 256    # videos in one feature shard: the most a killed extraction loses, per rank


@torch.no_grad()
def extract_features(args, encoder, videos, folder, rank, world, device, bad):
    """Full-fidelity snippet features of every video that decodes, each rank a disjoint stride, written
    to `folder` as it goes, SHARD_VIDEOS videos a shard; videos an earlier (killed) run already wrote
    are skipped. No collective carries features (ActivityNet at D = 512: 3 GB): merge_shards joins them."""
    folder.mkdir(parents=True, exist_ok=True)
    done = {vid for f in folder.glob("*.pt") for vid in torch.load(f, mmap=True, weights_only=True)["ids"]}
    todo = [v for v in videos[rank::world] if v.id not in done]       # (other ranks' new shards do not matter)
    if done:
        print(f"features, rank {rank}: {len(done)} videos in an earlier run's shards in {folder}, {len(todo)} to go")
    ids, feats = [], []

    def write_shard():
        if ids:
            save_checkpoint(folder / f"rank{rank}-{uuid.uuid4().hex[:8]}.pt", dict(ids=list(ids), feats=torch.stack(feats)))
            ids.clear()
            feats.clear()
    with shared_failure(f"feature extraction, rank {rank}"):     # ranks have different batch counts
        for batch in full_fidelity(args, todo, device, bad, "features", rank, max(1, args.batch_size // world)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                x = snippet_features(encoder, batch["frames"].to(device))            # (B, D, L)
            for vid, f in zip(batch["ids"], x.float().cpu().unbind(0)):
                if vid not in ids:                   # a broken video's stand-in repeats a video
                    ids.append(vid)
                    feats.append(f)                                                        # (D, L)
            if len(ids) >= SHARD_VIDEOS:
                write_shard()
        write_shard()
    bad.flush("while extracting features")           # (a collective: every shard is written after it)


def merge_shards(folder, ids):
    """The shards of `folder` -> (the ids found, in the order of `ids`; their features (N, D, L)). One
    shard is mapped at a time, so the peak is the merged tensor plus one shard."""
    files = sorted(folder.glob("*.pt"))
    found = {vid: (f, i) for f in files for i, vid in enumerate(torch.load(f, mmap=True, weights_only=True)["ids"])}
    order = [vid for vid in ids if vid in found]
    merged = None
    for f in files:
        part = torch.load(f, mmap=True, weights_only=True)
        if merged is None:
            merged = torch.empty(len(order), *part["feats"].shape[1:])                              # (N, D, L)
        for n, vid in enumerate(order):
            if found[vid][0] == f:
                merged[n] = part["feats"][found[vid][1]]                                         # (D, L)
        del part                                     # unmapped before the next shard
    return order, merged if merged is not None else torch.empty(0)


def features_for(args, encoder, videos, rank, world, device, bad):
    """dict id -> (D, L) full-fidelity features, from <out>/features.pt when encoder, fidelity and videos
    match, else extracted (shards in <out>/features-<key>/, merged into features.pt, then removed)."""
    path = Path(args.out) / "features.pt"
    weights = hashlib.sha1()
    for k, v in encoder.state_dict().items():
        weights.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    key = dict(encoder=weights.hexdigest(), amp=args.amp, source="store" if args.store else "videos", snippets=args.snippets, frames=args.frames,
               stride=args.stride, size=args.size, ids=sorted(v.id for v in videos))
    reuse = [False]
    if rank == 0:
        try:
            cached = torch.load(path, mmap=True, weights_only=True)
            reuse = [cached["key"] == key and {"ids", "feats", "broken"} <= set(cached)]
        except Exception:                            # absent, or not a features file of this version
            pass
    if dist.is_initialized():
        dist.broadcast_object_list(reuse, src=0)     # one decision: every rank reaches the same collectives
    if reuse[0]:
        print0(f"features reused from {path}")
        bad.add(torch.load(path, mmap=True, weights_only=True)["broken"] if rank == 0 else [])
        bad.flush("when the features were extracted")
    else:
        folder = Path(args.out) / f"features-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]}"
        extract_features(args, encoder, videos, folder, rank, world, device, bad)
        with shared_failure("merging the feature shards"):
            if rank == 0:                            # peak: the merged tensor plus one shard
                ids, feats = merge_shards(folder, [v.id for v in videos])
                save_checkpoint(path, dict(key=key, ids=ids, feats=feats, broken=list(bad.broken.values())))
                shutil.rmtree(folder)
    cached = torch.load(path, mmap=True, weights_only=True)     # every rank maps the one file
    return dict(zip(cached["ids"], cached["feats"].unbind(0)))


def train_video_classifier(feats, videos, classes, seed):
    """Video-level classes for the class assignment of Sec. 3.3: a linear layer on pooled features."""
    x = torch.stack([pooled(feats[v.id]) for v in videos])                                  # (N, 2D)
    y = torch.zeros(len(videos), len(classes))                                                 # (N, K)
    for i, v in enumerate(videos):
        for label in v.labels:
            y[i, classes.index(label)] = 1.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = video_classifier(x.shape[1] // 2, len(classes))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(300):
            loss = F.binary_cross_entropy_with_logits(clf(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf


def pooled(feat):
    """A video's (D, L) snippet features -> (2D,): mean and max over time."""
    return torch.cat([feat.mean(1), feat.amax(1)])


def video_classifier(dim, num_classes):
    return nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, num_classes))     # on [mean, max]


def video_class_scores(clf, feat):
    with torch.no_grad():
        return torch.sigmoid(clf(pooled(feat)[None]))[0].numpy()


def rescale(x, L):
    """(D, T) features -> (D, L) by linear interpolation between the T snippet centres: output i samples
    the input at position (i + 0.5) T / L - 0.5, clamped to [0, T - 1] (F.interpolate's align_corners=
    False rule: bin centres map to bin centres, and T = L is the identity)."""
    return F.interpolate(x[None], size=L, mode="linear", align_corners=False)[0]


def read_features(folder, videos, L):
    """Precomputed features, one <id>.npy or v_<id>.npy of shape (T, D) a video (T snippets in time order
    covering the video; any T, one D) -> dict id -> (D, L), rescaled and layer-normalised like encoder
    features (snippet_features). Every video needs its file."""
    feats, first, missing = {}, None, []                   # first: (D, path) of the first file read
    for v in videos:
        path = next((p for p in (Path(folder) / f"{v.id}.npy", Path(folder) / f"v_{v.id}.npy") if p.is_file()), None)
        if path is None:
            missing.append(v.id)
            continue
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise data.BadInput(f"{path}: not a numpy array file ({e})") from None
        if x.ndim != 2 or min(x.shape) < 1 or x.dtype.kind not in "iuf" or not np.isfinite(x).all():
            raise data.BadInput(f"{path}: expected a finite (T, D) array of snippet features, got shape {x.shape}")
        first = first or (x.shape[1], path)
        if x.shape[1] != first[0]:
            raise data.BadInput(f"{path}: D = {x.shape[1]}, but {first[1]} has D = {first[0]}")
        y = rescale(torch.from_numpy(x.astype(np.float32)).T, L)                              # (D, L)
        feats[v.id] = F.layer_norm(y.T, y.shape[:1]).T.contiguous()                           # (D, L)
    if missing:
        raise data.BadInput(f"--features {folder}: no <id>.npy or v_<id>.npy for {len(missing)} video(s): "
                         + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return feats


# Paper Sec. 3.3: stage 3 searches the head's learning rate in this set.
LR_GRID = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)


def train_head(args, head, opt, sched, feats, videos, start, rank, world, device, after_epoch=None):
    """G-TAD head training on fixed features (D, L) of `videos`, epochs [start, args.epochs)."""
    L = args.snippets
    x = torch.stack([feats[v.id] for v in videos])                                     # (N, D, L)
    labels = [batch_targets([data.normalised_segments(v)], L, "cpu") for v in videos]
    start_t, end_t, iou = (torch.cat(t) for t in zip(*labels))                          # (N, L), (N, L), (N, L, L)
    ds = torch.utils.data.TensorDataset(x, start_t, end_t, iou)
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    model = DDP(head) if world > 1 else head
    for epoch in range(start, args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        sums, n = {}, 0
        batches = DataLoader(ds, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
        for step, (xb, sb, eb, ib) in enumerate(progress(batches, f"head {epoch}", rank)):
            if args.max_steps and step >= args.max_steps:
                break
            with shared_failure(f"head epoch {epoch} step {step}"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                    out = model(xb.to(device))
                losses = gtad.loss(out, sb.to(device), eb.to(device), ib.to(device),
                                   generator=loss_generator(args, rank, epoch, step, device))
                if not torch.isfinite(losses["total"]):
                    raise FloatingPointError("non-finite loss")
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        lr = opt.param_groups[0]["lr"]           # the lr this epoch ran with
        sched.step()
        if after_epoch:
            after_epoch(epoch, dict(**{k: v / max(n, 1) for k, v in sums.items()}, lr=lr, time=round(time.time() - t0, 2)))
    return head.eval()


def head_and_optimizer(args, dim, lr, device):
    # G-TAD recipe (spec Sec. 4): Adam, weight decay 1e-4, lr x 0.1 after 5 of 10 epochs.
    head = gtad.GTAD(gtad.GTADConfig(feat_dim=dim)).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    return head, opt, torch.optim.lr_scheduler.StepLR(opt, args.lr_step, gamma=0.1)


def search_lr(args, feats, train, classes, rank, world, device):
    """The paper's lr search (Sec. 3.3), scored by average mAP on a held-out tenth of the *training*
    videos (a seeded draw) after training on the other nine tenths, classes assigned by a video classifier
    trained on those nine tenths too: the validation subset is never used."""
    held = set(np.random.default_rng([args.seed, 10]).permutation(len(train))[:max(1, len(train) // 10)].tolist())
    fit = [v for i, v in enumerate(train) if i not in held]
    dev = [v for i, v in enumerate(train) if i in held]
    gt = dict(database={v.id: dict(subset="validation", duration=v.duration, annotations=[
        dict(segment=list(map(float, s)), label=lab) for s, lab in zip(v.segments, v.labels)]) for v in dev})
    clf = train_video_classifier(feats, fit, classes, args.seed)
    scores = {}
    for lr in LR_GRID:
        head = train_head(args, *head_and_optimizer(args, feats[train[0].id].shape[0], lr, device), feats, fit, 0,
                          rank, world, device)
        results, _ = known_classes_only({v.id: detections_for(head, feats[v.id], v.duration, video_class_scores(
            clf, feats[v.id]), classes, args, device) for v in dev}, dev)
        scores[lr] = evaluate.detection_map(gt, dict(results=results))[1] if any(results.values()) else 0.0
        print0(f"lr search: lr {lr:g} -> {100 * scores[lr]:.2f} average mAP on {len(dev)} held-out training videos")
    best = [max(scores, key=scores.get)]
    if world > 1:
        dist.broadcast_object_list(best, src=0)            # ranks agree even if their scores differ
    return best[0], scores


@torch.no_grad()
def recalibrate_bn(args, encoder, videos, device, bad):
    """Re-estimate the encoder's BatchNorm statistics at full fidelity on `videos` (beyond the paper).

    Stage 2 leaves the running statistics of its last low-fidelity configuration (e.g. 112^2 frames),
    and stage 3 then normalises full-fidelity frames with them. Weights do not change: every BatchNorm
    averages its batch statistics over all the given videos (momentum None), then the encoder is frozen
    again. Every rank uses the same videos, so the statistics agree across ranks."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    with shared_failure("bn-recal"):
        for batch in full_fidelity(args, videos, device, bad, "bn-recal", rank=int(not is_rank0())):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                encoder(tsm.normalize(batch["frames"].flatten(0, 1).to(device)))           # (B*L, F, 3, H, W)
    for m in norms:
        m.momentum = 0.1
    bad.flush("while re-estimating BatchNorm")
    return encoder.eval()


def stage_head(args, rank, world, device):
    if args.init == "none" and not args.features:
        print0("stage head: the encoder is frozen and random; --init should name imagenet or a stage-1 or stage-2 checkpoint")
    train, missing = load_split(args, "training")
    val, val_missing = load_split(args, "validation")
    classes = data.class_names(train + val)
    bad = BadVideos(args, "training and validation", len(train + val + missing + val_missing), missing + val_missing)
    if args.features:                              # no encoder: the head trains on the given features
        encoder, feats = None, read_features(args.features, train + val, args.snippets)
    else:
        with torch.random.fork_rng(devices=[]):  # one encoder on every rank, even a random one (--init none)
            torch.manual_seed(args.seed)
            encoder = build_encoder(args).to(device, memory_format=torch.channels_last).eval()
        if args.bn_recal:
            pick = np.random.default_rng([args.seed, 11]).permutation(len(train))[:args.bn_recal]
            encoder = recalibrate_bn(args, encoder, [train[i] for i in sorted(pick)], device, bad)
        feats = features_for(args, encoder, train + val, rank, world, device, bad)
        train, val, lost = [v for v in train if v.id in feats], [v for v in val if v.id in feats], \
            sorted(v.id for v in train + val if v.id not in feats)
        if lost:                                   # broken videos (log.jsonl says why): skipped
            print0(f"{len(lost)} video(s) without features (they failed to decode): {', '.join(lost)}")
        if not train or not val:
            raise data.BadInput(f"no training or no validation video of {args.anno} decodes in {args.store or args.videos}")

    if args.lr_search:
        args.lr, scores = search_lr(args, feats, train, classes, rank, world, device)
        print0(f"lr search: stage 3 trains with lr {args.lr:g}")
    head, opt, sched = head_and_optimizer(args, feats[train[0].id].shape[0], args.lr, device)
    start = resume_state(args, {"head": head}, opt, sched)[0]
    clf = train_video_classifier(feats, train, classes, args.seed)

    def after_epoch(epoch, record):
        if rank == 0:
            save_checkpoint(Path(args.out) / "last.pt", dict(
                stage="head", encoder=encoder and encoder.state_dict(), encoder_cfg=encoder and asdict(encoder.cfg),
                head=head.state_dict(), head_cfg=asdict(head.cfg), video_classifier=clf.state_dict(),
                classes=classes, optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch + 1,
                args=vars(args)))
        log_epoch(args, dict(stage="head", epoch=epoch, **record))
    train_head(args, head, opt, sched, feats, train, start, rank, world, device, after_epoch)
    if rank == 0:
        detect_and_evaluate(args, head, clf, feats, val, classes, device)


def detections_for(head, feat, duration, class_scores, class_names, args, device):
    with torch.no_grad():
        out = head(feat[None].to(device))
    one = {k: v[0].float().cpu() for k, v in out.items()}
    segments, scores = gtad.decode(one, duration, sigma=args.nms_sigma, top_k=args.top_k)
    return gtad.assign_classes(segments, scores, class_scores, class_names, top=2)


def known_classes_only(results, videos):
    """The official evaluator refuses labels absent from the evaluated videos' ground truth; a class
    seen only in training can still be predicted, so drop those. -> (results, number dropped)."""
    known = {label for v in videos for label in v.labels}
    dropped = sum(d["label"] not in known for found in results.values() for d in found)
    return {vid: [d for d in found if d["label"] in known] for vid, found in results.items()}, dropped


def detect_and_evaluate(args, head, clf, feats, val, classes, device):
    """Detections of the usable validation videos; the evaluation takes the ground truth of all of them,
    so a missing or broken one counts as missed, as the official protocol counts it."""
    total = len(data.read_annotations(args.anno, "validation")[0])
    if total > len(val):
        print0(f"{total - len(val)} of {total} validation videos have no file or failed to decode: no detections, "
               "so the evaluation counts their instances as misses")
    external = gtad.read_video_scores(args.video_scores) if args.video_scores else None
    results = {}
    for v in val:
        if external:
            if v.id not in external[0]:
                raise data.BadInput(f"{args.video_scores}: no video-level scores for video {v.id}")
            scores, names = external[0][v.id], external[1]
        else:
            scores, names = video_class_scores(clf, feats[v.id]), classes
        results[v.id] = detections_for(head, feats[v.id], v.duration, scores, names, args, device)
    results, dropped = known_classes_only(results, val)
    if dropped:
        print0(f"warning: {dropped} detections carry classes absent from the validation ground truth; dropped")
    out = Path(args.out)
    with open(out / "detections.json", "w") as f:
        json.dump(dict(version="VERSION 1.3", results=results, external_data={}), f)
    if any(results.values()):
        per_tiou, average = evaluate.detection_map(args.anno, str(out / "detections.json"), subset="validation")
    else:                      # a head that scores everything 0 decodes nothing: that is mAP 0, not bad input
        print0("warning: no detections for any validation video")
        per_tiou, average = np.zeros(len(evaluate.THRESHOLDS)), 0.0
    metrics = {f"mAP@{t:.2f}": float(m) for t, m in zip(evaluate.THRESHOLDS, per_tiou)}
    metrics["average-mAP"] = float(average)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print0(" | ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k[-4:] in ("0.50", "0.75", "0.95", "-mAP")))


# ----------------------------------------------------------------------------- utilities
def saved_bytes(fn, params):
    """Run fn() and count the bytes autograd keeps for backward (each storage once), leaving out the
    weights (counted as fixed) and G-TAD's sparse alignment matrices (constants shared by all videos)."""
    storages, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.layout == torch.strided and t.untyped_storage().data_ptr() not in skip:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def step_cost(fn, params, device, amp):
    """Bytes held for backward (CUDA: peak allocated) and seconds of one forward + backward of fn."""
    for _ in range(2):                         # the first run warms up allocators and caches
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, held = saved_bytes(fn, params)
        out.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            held = torch.cuda.max_memory_allocated(device) - base
        seconds = time.perf_counter() - t0
    return held, seconds


def step_flops(fn, amp, device):
    """Floating-point operations (2 per multiply-add) of one forward + backward of fn, as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fn()
        out.backward()
    return counter.get_total_flops()


def measure(args, fid, device, checkpoint, amp, snippets):
    """Memory per video, seconds per video, fixed memory and FLOPs per video of a training step at fid.

    Memory per video is the marginal cost: the encoder runs on k and 2k snippets (snippets are
    independent, so it scales exactly by L / k), the head on 1 and 2 videos at the configuration's L.
    What does not grow with the batch (weights, gradients, bf16 weight copies) is the fixed part.
    """
    encoder = tsm.TSM(tsm.TSMConfig(depth=args.depth, checkpoint=checkpoint)).to(device).train()
    head = gtad.GTAD(gtad.GTADConfig(feat_dim=encoder.dim)).to(device).train()
    labels = batch_targets([torch.tensor([[0.2, 0.5], [0.6, 0.9]])], fid.L, device)

    def encoder_step(n):
        frames = torch.randint(0, 256, (n, args.frames, 3, fid.H, fid.W), dtype=torch.uint8, device=device)
        return lambda: encoder(tsm.normalize(frames)).float().square().mean()

    def head_step(b):
        feats = torch.randn(b, encoder.dim, fid.L, device=device, requires_grad=True)      # (b, D, L)
        return lambda: gtad.loss(head(feats), *(t.expand(b, *t.shape[1:]) for t in labels))["total"]
    encoder_params, head_params = list(encoder.parameters()), list(head.parameters())
    (e1, te), (e2, _) = (step_cost(encoder_step(n), encoder_params, device, amp) for n in (snippets, 2 * snippets))
    (h1, th), (h2, _) = (step_cost(head_step(b), head_params, device, amp) for b in (1, 2))
    per_snippet, per_head = (e2 - e1) / snippets, h2 - h1
    weights = 2 * sum(p.numel() * p.element_size() for p in [*encoder.parameters(), *head.parameters()])
    fixed = weights + max(0.0, e1 - per_snippet * snippets) + max(0.0, h1 - per_head)
    flops = step_flops(encoder_step(snippets), amp, device) * fid.L / snippets + step_flops(head_step(1), amp, device)
    return per_snippet * fid.L + per_head, te * fid.L / snippets + th, fixed, flops


def stage_plan(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full, lofis = fidelity_grid(args)
    configs = [("full", full), *zip(("S", "T", "ST"), lofis)]
    variants = [(c, a) for c in (False, True) for a in (False, True)] if args.budget_gb else \
        [(args.checkpoint_encoder, args.amp)]
    rows = []
    for name, fid in progress(configs, "plan"):
        snippets = min(fid.L, args.plan_snippets or (25 if device.type == "cuda" else 4))
        for ckpt, amp in variants:
            per_video, seconds, fixed, flops = measure(args, fid, device, ckpt, amp, snippets)
            rows.append(dict(config=name, fidelity=str(fid), checkpoint=ckpt, amp=amp, snippets_run=snippets,
                             mib_per_video=per_video / 2**20, s_per_video=seconds, fixed_mib=fixed / 2**20,
                             videos_per_s=1 / seconds, tflop_per_video=flops / 1e12, tflops=flops / seconds / 1e12))
    print0(f"device {device}: memory per video = marginal activation memory of a training step (encoder on "
           f"{rows[0]['snippets_run']} and {2 * rows[0]['snippets_run']} snippets, scaled to L; head at L); "
           f"fixed {rows[0]['fixed_mib']:.0f} MiB (weights, grads)")
    print0("| config | L x H x W | ckpt | amp | MiB / video | x full | s / video | videos / s | TFLOP / video | "
           "TFLOP/s | fits |")
    print0("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(q for q in rows if q["config"] == "full" and (q["checkpoint"], q["amp"]) == (r["checkpoint"], r["amp"]))
        r["ratio"] = r["mib_per_video"] / ref["mib_per_video"]
        if args.budget_gb:
            r["fits"] = max(0, int((args.budget_gb * 1024 - r["fixed_mib"]) // r["mib_per_video"]))
        print0(f"| {r['config']} | {r['fidelity']} | {r['checkpoint']} | {r['amp']} | {r['mib_per_video']:.0f} | "
               f"{r['ratio']:.2f} | {r['s_per_video']:.2f} | {r['videos_per_s']:.2f} | {r['tflop_per_video']:.3f} | "
               f"{r['tflops']:.2f} | {r.get('fits', '-')} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "plan.json").write_text(json.dumps(rows, indent=1))
    return rows


def stage_detect(args):
    """Detections and a timeline picture for one video file, from a stage-3 run folder."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Path(args.run or args.out)
    ck = load_checkpoint(run / "last.pt")
    if ck.get("stage") != "head":
        raise data.BadInput(f"{run / 'last.pt'} is not a stage-3 (head) checkpoint")
    if ck.get("encoder") is None:
        raise data.BadInput(f"{run / 'last.pt'}: this head was trained on precomputed features (--features); "
                         "it has no encoder to turn a video into features")
    encoder = tsm.TSM(tsm.TSMConfig(**ck["encoder_cfg"]))
    encoder.load_state_dict(ck["encoder"])
    head = gtad.GTAD(gtad.GTADConfig(**ck["head_cfg"]))
    head.load_state_dict(ck["head"])
    clf = video_classifier(encoder.dim, len(ck["classes"]))
    clf.load_state_dict(ck["video_classifier"])
    trained = argparse.Namespace(**ck["args"])
    for k in ("snippets", "frames", "stride", "size", "amp"):     # features as stage 3 made them
        setattr(args, k, getattr(trained, k))
    full, _ = fidelity_grid(args)
    frames, duration = data.read_snippets(args.video, full, args.frames, args.stride)   # (L, F, 3, H, W)
    encoder, head = encoder.to(device).eval(), head.to(device).eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        feat = snippet_features(encoder, frames[None].to(device))[0].float().cpu()       # (D, L)
    dets = detections_for(head, feat, duration, video_class_scores(clf, feat), ck["classes"], args, device)
    stem = Path(args.video).stem
    (run / f"detect_{stem}.json").write_text(json.dumps(dict(video=args.video, duration=duration, detections=dets)))
    truth = []
    if args.anno:
        videos, _ = data.read_annotations(args.anno)
        vid = stem[2:] if stem.startswith("v_") and stem[2:] in videos else stem
        if vid in videos:
            truth = [dict(label=lab, segment=list(seg)) for seg, lab in zip(videos[vid].segments, videos[vid].labels)]
    draw_timeline(run / f"detect_{stem}.png", duration, truth, dets[:10])
    print0(f"{len(dets)} detections -> {run / f'detect_{stem}.json'}, {run / f'detect_{stem}.png'}")
    return dets


def draw_timeline(path, duration, truth, dets, width=1000, row=26):
    """Ground truth (green) above the top detections (blue, shade = score), on one time axis."""
    import cv2
    rows = [("GT " + t["label"], t["segment"], 1.0, (60, 170, 60)) for t in truth] + \
           [(f"{d['label']} {d['score']:.2f}", d["segment"], d["score"], (200, 110, 40)) for d in dets]
    img = np.full((row * (len(rows) + 1) + 10, width, 3), 255, np.uint8)
    x = lambda t: int(10 + (width - 20) * min(max(t / max(duration, 1e-6), 0.0), 1.0))
    cv2.line(img, (10, row // 2), (width - 10, row // 2), (0, 0, 0), 1)
    cv2.putText(img, f"0 s ... {duration:.1f} s", (12, row // 2 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for i, (text, (t0, t1), score, colour) in enumerate(rows, start=1):
        y = row * i + 4
        shade = tuple(int(255 - (255 - c) * (0.3 + 0.7 * score)) for c in colour)
        cv2.rectangle(img, (x(t0), y), (max(x(t1), x(t0) + 1), y + row - 6), shade, -1)
        cv2.putText(img, text, (x(t0) + 3, y + row - 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def main(argv=None):
    """Bad input (a flag, a file, the data) ends in one line on stderr and exit code 2, not a traceback."""
    try:
        return run(get_args(argv))
    except data.BadInput as e:
        print(f"lofi.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(args):
    if args.stage == "plan":
        return stage_plan(args)
    if args.stage == "detect":
        return stage_detect(args)
    rank, world, device = compute_init(args)
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print0(json.dumps(vars(args)))
        if rank == 0:
            (Path(args.out) / "args.json").write_text(json.dumps(vars(args), indent=1))
            if not args.resume:
                for name in ("log.jsonl", "missing.txt"):
                    (Path(args.out) / name).unlink(missing_ok=True)
        dict(acp=stage_acp, lofi=stage_lofi, head=stage_head)[args.stage](args, rank, world, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
