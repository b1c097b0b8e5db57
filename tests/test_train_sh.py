"""train.sh: its arguments are checked before any stage runs."""
import fcntl
import subprocess

from conftest import ROOT


def train_sh(*args):
    return subprocess.run(["bash", str(ROOT / "train.sh"), *args], capture_output=True, text=True, timeout=60)


def test_missing_annotation_file_stops_with_a_clear_message(tmp_path):
    r = train_sh("--anno", str(tmp_path / "nope.json"), "--videos", str(tmp_path), "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "annotation file" in r.stderr and "nope.json" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_flags_are_refused(tmp_path):
    for args, words in ((["--preset", "huge"], "--preset"), (["--nproc", "0"], "--nproc"),
                        (["--frobnicate"], "unknown argument")):
        r = train_sh(*args, "--out", str(tmp_path / "runs"))
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
    anno = tmp_path / "a.json"
    anno.write_text("{}")
    r = train_sh("--anno", str(anno), "--videos", str(tmp_path / "missing"))
    assert r.returncode == 2 and "video folder" in r.stderr
    r = train_sh("--anno", str(anno), "--store", str(tmp_path))
    assert r.returncode == 2 and "not a frame store" in r.stderr and str(tmp_path) in r.stderr
    r = train_sh("--anno", str(anno), "--store", str(tmp_path), "--videos", str(tmp_path))
    assert r.returncode == 2 and "not both" in r.stderr


def test_init_names_a_checkpoint_or_imagenet(tmp_path):
    r = train_sh("--init", str(tmp_path / "k400_tsm.pt"), "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "--init" in r.stderr and "k400_tsm.pt" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = train_sh("--init", "none", "--acp-plus", "--preset", "huge", "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "--preset" in r.stderr and "--init" not in r.stderr   # none: a random encoder
    r = train_sh("--help")
    assert r.returncode == 0 and "--init PATH|imagenet|none" in r.stdout and "skip stage 1" in r.stdout
    assert "--acp-plus" in r.stdout and "synthetic Kinetics" in r.stdout


def test_runs_in_out_are_never_overwritten_unasked(tmp_path):
    held = tmp_path / "runs" / "baseline" / "last.pt"
    held.parent.mkdir(parents=True)
    held.write_bytes(b"a run")
    r = train_sh("--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and str(held) in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert held.read_bytes() == b"a run" and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["baseline"]
    r = train_sh("--out", str(tmp_path / "runs"), "--resume", "--overwrite")
    assert r.returncode == 2 and "not both" in r.stderr


def test_one_train_sh_at_a_time_in_a_folder(tmp_path):
    """A second train.sh into a folder another holds (here: this test holds its lock) is refused before it
    deletes anything, even with --overwrite; the lock dies with its holder."""
    held = tmp_path / "runs" / "baseline" / "last.pt"
    held.parent.mkdir(parents=True)
    held.write_bytes(b"a run")
    with open(tmp_path / "runs" / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = train_sh("--out", str(tmp_path / "runs"), "--overwrite")
    assert r.returncode == 2 and f"'{tmp_path / 'runs'}': another train.sh is running in it" in r.stderr, r.stderr
    assert held.read_bytes() == b"a run"
    (tmp_path / "bad.json").write_text("{}")                         # free again: it gets as far as stage 1
    r = train_sh("--out", str(tmp_path / "runs"), "--overwrite", "--anno", str(tmp_path / "bad.json"), "--videos",
                 str(tmp_path))
    assert r.returncode == 1 and "stage 'acp' failed" in r.stderr and not held.exists(), r.stderr
