"""Every bad input of ep-train and ep-gradcheck gets one clear line, never a traceback or a
wrong exit status (issue 11): one table, one row per case.

A row is (CLI, set-up, expected exit status, words expected on stderr). The set-up gets a
fresh folder and the tiny runs made once for the module, damages what the case damages, and
returns the arguments (and optionally environment variables, a check of the aftermath, a
clean-up), or None when the case cannot be set up on this machine. Every row, besides its own words: no "Traceback" and no advice to load with
``weights_only=False`` on stderr; an ep-train that fails leaves no new run folder behind
(everything is checked before anything is created); an ep-gradcheck usage error is found
before any gradient is computed. The CLIs run in this process (``main(argv)``).
"""
import json
import os
import random
import shlex
import shutil

import pytest
import torch

from ep_kernels.app import gradcheck, train
from ep_kernels.app.checkpoint import LOCK_FILE, RunFolderLock

TINY = ["--preset", "mlp", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--epochs", "1",
        "--T1", "3", "--T2", "2", "--threads", "1", "--no-progress"]
GC = ["--width", "0.125", "--batch", "2", "--dtypes", "float64", "--no-gdu"]  # ep-gradcheck, small preset
FORBIDDEN = ("Traceback", "weights_only=False")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished one-epoch runs: the mlp (the one the cases damage), a wider one, a small ConvNet."""
    base = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {"mlp": [], "wide": ["--width", "0.5"],
                        "small": ["--preset", "small", "--width", "0.125"]}.items():
        made[name] = str(base / name)
        assert train.main(TINY + extra + ["--run-dir", made[name]]) == 0
    return made


# --- damage -----------------------------------------------------------------------------------

def _ckpt(rd):
    return os.path.join(rd, "checkpoint.pt")


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    _write(path, data[:len(data) // 2])


class _Payload:
    """A pickle that runs code when loaded without weights_only: it would create a folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _malicious(path):
    torch.save({"format": 1, "model": {"w": _Payload(path + ".pwned")}}, path)


def _config(rd, edit):
    path = os.path.join(rd, "config.json")
    with open(path) as f:
        doc = json.load(f)
    _write(path, json.dumps(edit(doc)).encode())


def _with_config(doc, **changes):
    doc["config"].update(changes)
    return doc


def _foreign_ckpt(name, relabel=False):
    """Put run ``name``'s checkpoint in the copy (``relabel``: with the copy's own config in it,
    so that only its weights differ)."""
    def damage(rd, runs):
        ck = torch.load(_ckpt(runs[name]), weights_only=True)
        if relabel:
            ck["config"] = torch.load(_ckpt(rd), weights_only=True)["config"]
        torch.save(ck, _ckpt(rd))
    return damage


def _plant_temp_files(rd, runs):
    for name in ("checkpoint.pt.tmp999999", "metrics.json.tmp12", "notes.txt.tmp5", "checkpoint.pt.tmpx"):
        _write(os.path.join(rd, name), b"half a file")


def _temp_files_cleaned(rd):
    left = sorted(os.listdir(rd))
    assert "checkpoint.pt.tmp999999" not in left and "metrics.json.tmp12" not in left, left
    assert "notes.txt.tmp5" in left and "checkpoint.pt.tmpx" in left, left  # not ours: kept
    assert LOCK_FILE not in left, left  # the lock is gone with the run


# --- set-ups ----------------------------------------------------------------------------------

def resume(damage, after=None):
    """``ep-train --resume`` of a copy of the mlp run, damaged by ``damage(run_dir, runs)``
    (which may return a clean-up)."""
    def setup(tmp, runs):
        rd = str(tmp / "run")
        shutil.copytree(runs["mlp"], rd)
        cleanup = damage(rd, runs)
        return dict(argv=["--resume", rd, "--no-progress"], cleanup=cleanup, after=after and (lambda: after(rd)))
    return setup


def _hold_lock(rd, runs):
    lock = RunFolderLock(rd, "--resume", ["--resume", rd]).acquire()  # as a first ep-train would
    return lock.release


def fresh(*args, env=None, run_dir=None):
    """A new tiny ep-train run; ``run_dir(tmp)`` makes the --run-dir (default: a new folder)."""
    def setup(tmp, runs):
        rd = run_dir(tmp) if run_dir else str(tmp / "new")
        return None if rd is None else dict(argv=TINY + ["--run-dir", rd] + list(args), env=env)
    return setup


def _a_file(tmp):
    _write(str(tmp / "afile"), b"x")
    return str(tmp / "afile")


def _read_only(tmp):
    """A folder this process cannot write in: mode 555, or for root (who writes anywhere)
    sysfs's, where nobody creates files; None (the row is skipped) if there is none."""
    if os.geteuid() != 0:
        os.mkdir(tmp / "ro", 0o555)
        return str(tmp / "ro")
    return "/sys/kernel" if os.path.isdir("/sys/kernel") and os.path.ismount("/sys") else None


def gc(*args, env=None, checkpoint=None, make=None):
    """``ep-gradcheck`` with ``args`` ("{tmp}" is the case's folder); ``checkpoint(tmp, runs)``
    gives its --checkpoint; ``make(tmp)`` prepares files first."""
    def setup(tmp, runs):
        if make:
            make(tmp)
        argv = [a.format(tmp=tmp) for a in args]
        if "--out" not in argv:
            argv += ["--out", str(tmp / "gc")]
        return dict(argv=argv + (["--checkpoint", checkpoint(tmp, runs)] if checkpoint else []), env=env)
    return setup


def _damaged_copy(damage):
    def make(tmp, runs):
        path = str(tmp / "checkpoint.pt")
        shutil.copy(_ckpt(runs["mlp"]), path)
        damage(path)
        return path
    return make


# --- the table --------------------------------------------------------------------------------

CASES = [
    # ep-train --resume: damaged checkpoint.pt
    ("ep-train", resume(lambda rd, r: _write(_ckpt(rd), b"")), 2, ["checkpoint.pt", "empty"]),
    ("ep-train", resume(lambda rd, r: _truncate(_ckpt(rd))), 2, ["checkpoint.pt", "damaged or truncated"]),
    ("ep-train", resume(lambda rd, r: _write(_ckpt(rd), random.Random(0).randbytes(4096))), 2,
     ["checkpoint.pt", "damaged"]),  # random bytes fail in many ways: every one of them says "damaged"
    ("ep-train", resume(lambda rd, r: _malicious(_ckpt(rd))), 2, ["checkpoint.pt", "refused", "code"]),
    ("ep-train", resume(lambda rd, r: torch.save(torch.zeros(3), _ckpt(rd))), 2, ["not an ep-train checkpoint"]),
    ("ep-train", resume(lambda rd, r: torch.save({"model": {}}, _ckpt(rd))), 2, ["not an ep-train checkpoint",
                                                                                  "optimizer"]),
    # ... damaged config.json
    ("ep-train", resume(lambda rd, r: _write(os.path.join(rd, "config.json"), b'{"config": {"preset": ')), 2,
     ["config.json", "not valid JSON"]),
    ("ep-train", resume(lambda rd, r: _config(rd, lambda d: {"invocations": []})), 2, ['no "config" object']),
    ("ep-train", resume(lambda rd, r: _config(rd, lambda d: dict(d, config=None))), 2, ['no "config" object']),
    ("ep-train", resume(lambda rd, r: _config(rd, lambda d: _with_config(d, T1="abc"))), 2,
     ['"T1"', "expected an int"]),
    ("ep-train", resume(lambda rd, r: _config(rd, lambda d: _with_config(d, preset="resnet"))), 2,
     ['"preset"', "resnet"]),
    # ... a checkpoint of another run
    ("ep-train", resume(_foreign_ckpt("wide")), 2, ["disagree", "width: 0.5 in checkpoint.pt, 1.0 in config.json"]),
    ("ep-train", resume(_foreign_ckpt("small")), 2,
     ["disagree", "preset: 'small' in checkpoint.pt, 'mlp' in config.json"]),
    ("ep-train", resume(_foreign_ckpt("wide", relabel=True)), 2, ["does not fit the network", "--width 1"]),
    # ... a run folder another ep-train holds; temporary files a killed run left
    ("ep-train", resume(_hold_lock), 2, ["another ep-train", f"pid {os.getpid()}"]),
    ("ep-train", resume(_plant_temp_files, after=_temp_files_cleaned), 0,
     ["removed 2 temporary files", "checkpoint.pt.tmp999999"]),
    # ep-train, a new run: bad run folder, backend, beta
    ("ep-train", fresh(run_dir=_a_file), 2, ["--run-dir", "is not a folder"]),
    ("ep-train", fresh(run_dir=lambda tmp: os.path.join(_a_file(tmp), "run")), 2, ["is not a folder", "is a file"]),
    ("ep-train", fresh(run_dir=_read_only), 2, ["--run-dir", "cannot write"]),
    ("ep-train", fresh(env={"EP_KERNELS_BACKEND": "bogus"}), 2, ["EP_KERNELS_BACKEND", "bogus"]),
    ("ep-train", fresh("--beta", "1e39"), 2, ["--beta 1e+39", "out of range", "float32"]),
    ("ep-train", fresh("--beta", "1e-45"), 2, ["--beta 1e-45", "out of range", "float32"]),
    ("ep-train", fresh("--max-minutes", "1e-6", run_dir=lambda tmp: str(tmp / "my run $HOME")), 0,
     ["Resume with:  ep-train --resume '", "my run $HOME'"]),
    # ep-gradcheck: 0 passed, 1 failed check, 2 bad input (before computing)
    ("ep-gradcheck", gc(*GC, "--betas", "1e-3", "--T1", "120", "--T2", "20"), 0, ["beta=0.001"]),
    ("ep-gradcheck", gc(*GC, "--betas", "0.5", "--T1", "3", "--T2", "2"), 1,
     ["check failed", "below --min-cosine 0.9999"]),
    ("ep-gradcheck", gc("--preset", "bogus"), 2, ["--preset", "bogus"]),
    ("ep-gradcheck", gc("--width", "0"), 2, ["--width", "must be > 0"]),
    ("ep-gradcheck", gc("--width", "nan"), 2, ["--width", "finite"]),
    ("ep-gradcheck", gc("--dataset", "bogus"), 2, ["--dataset", "bogus"]),
    ("ep-gradcheck", gc("--betas", "abc"), 2, ["--betas", "numbers"]),
    ("ep-gradcheck", gc("--betas", "1e39", "--dtypes", "float32"), 2, ["--betas 1e+39", "out of range", "float32"]),
    ("ep-gradcheck", gc("--T1", "3", "--T2", "5"), 2, ["--T2", "--T1"]),
    ("ep-gradcheck", gc(env={"EP_KERNELS_BACKEND": "bogus"}), 2, ["EP_KERNELS_BACKEND", "bogus"]),
    ("ep-gradcheck", gc(checkpoint=lambda tmp, r: str(tmp / "nowhere")), 2, ["--checkpoint", "no such file"]),
    ("ep-gradcheck", gc(checkpoint=_damaged_copy(_truncate)), 2, ["checkpoint.pt", "damaged or truncated"]),
    ("ep-gradcheck", gc(checkpoint=_damaged_copy(_malicious)), 2, ["checkpoint.pt", "refused", "code"]),
    ("ep-gradcheck", gc("--out", "{tmp}/afile", checkpoint=lambda tmp, r: r["mlp"], make=_a_file), 2,
     ["--out", "is not a folder"]),
]


def _call(cli, argv):
    main = train.main if cli == "ep-train" else gradcheck.main
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_errors(tmp_path, runs, capsys, monkeypatch):
    problems = []
    for i, (cli, setup, status, words) in enumerate(CASES):
        tmp = tmp_path / f"case{i}"
        tmp.mkdir()
        case = setup(tmp, runs)
        if case is None:  # not possible on this machine
            continue
        argv = case["argv"]
        label = f"row {i}: {cli} {shlex.join(argv)}"
        with monkeypatch.context() as m:
            for k, v in (case.get("env") or {}).items():
                m.setenv(k, v)
            new_dir = argv[argv.index("--run-dir") + 1] if "--run-dir" in argv else None
            new_dir = new_dir if new_dir and not os.path.exists(new_dir) else None
            capsys.readouterr()
            try:
                rc = _call(cli, argv)
            except Exception as e:  # noqa: BLE001 -- the command line would have shown a traceback
                rc = f"a traceback ({type(e).__name__}: {e})"
            finally:
                if case.get("cleanup"):
                    case["cleanup"]()
            err = capsys.readouterr().err
        if rc != status:
            problems.append(f"{label}: exit status {rc}, expected {status}; stderr: {err[-600:]}")
            continue
        for w in FORBIDDEN:
            if w in err:
                problems.append(f"{label}: {w!r} on stderr: {err[-600:]}")
        missing = [w for w in words if w not in err]
        if missing:
            problems.append(f"{label}: {missing} not on stderr: {err[-600:]}")
        if status != 0 and new_dir and os.path.exists(new_dir):
            problems.append(f"{label}: left {new_dir} behind")
        if cli == "ep-gradcheck" and status == 2 and "ep-gradcheck: beta=" in err:
            problems.append(f"{label}: computed before reporting the error")
        if status != 0 and status != 1 and len([l for l in err.splitlines() if "error:" in l]) != 1:
            problems.append(f"{label}: not one error line: {err[-600:]}")
        if case.get("after"):
            try:
                case["after"]()
            except AssertionError as e:
                problems.append(f"{label}: {e}")
    assert not problems, "\n".join(problems)
    assert not any(p.name.endswith(".pwned") for p in tmp_path.rglob("*"))  # the pickle's payload never ran
