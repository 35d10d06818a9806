"""Faults users meet: a second writer, a crashed writer, truncated and damaged files, full disks, read-only
media, over-long keys, absurd headers. Crash-prone cases run in a child process so a crash is observed."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest

import lmdbkit
from lmdbkit import codec, store
from lmdbkit.errors import (CommitError, CorruptItemError, DatabaseBusyError, DiskFullError, EncodeError,
                            KeyTooLongError, LmdbkitError, NotADatabaseError, ReadOnlyError,
                            TruncatedDatabaseError)

from conftest import make_samples

ROOT = os.geteuid() == 0


def run_py(code: str, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdbkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def big_db(path, n=40, size=64 * 1024):
    """A finished database whose items span several pages each (overflow pages)."""
    rng = np.random.default_rng(1)
    with lmdbkit.Writer(path, index_fields=("label",)) as w:
        for i in range(n):
            w.append({"x": rng.standard_normal(size // 4).astype(np.float32), "label": i % 3}, key=f"k{i}")
    return path


# -- one writer per database, across processes ------------------------------------------------------

SECOND_WRITER = """
import sys, lmdbkit
try:
    with lmdbkit.Writer(sys.argv[1], mode=sys.argv[2]) as w:
        for i in range(10):
            w.append({"who": "B", "i": i}, key=f"B/{i}")
    print("WROTE")
except lmdbkit.LmdbkitError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_second_writer_process_is_refused_with_holders_pid(tmp_path, mode):
    path = tmp_path / "db.lmdb"
    w = lmdbkit.Writer(path, commit_items=5)
    for i in range(12):
        w.append({"who": "A", "i": i}, key=f"A/{i}")
    p = run_py(SECOND_WRITER, path, mode)
    assert "WROTE" not in p.stdout, p.stdout
    assert p.stdout.startswith("DatabaseBusyError") and f"pid {os.getpid()}" in p.stdout and str(path) in p.stdout
    for i in range(12, 22):
        w.append({"who": "A", "i": i}, key=f"A/{i}")
    w.close()
    with lmdbkit.Reader(path) as r:
        assert len(r) == 22 and [s["i"] for s in r] == list(range(22)) and {s["who"] for s in r} == {"A"}
        assert r.get("A/12")["i"] == 12


def test_killed_writer_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "db.lmdb"
    code = """
    import sys, time, lmdbkit
    w = lmdbkit.Writer(sys.argv[1], commit_items=1)
    w.append({"i": 0}, key="a")
    print("READY", flush=True)
    time.sleep(60)
    """
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    with pytest.raises(DatabaseBusyError, match=f"pid {p.pid}"):
        lmdbkit.Writer(path, mode="append")
    p.send_signal(signal.SIGKILL)
    p.wait()
    with lmdbkit.Writer(path, mode="append") as w:  # the kernel dropped the dead holder's lock
        assert len(w) == 1
        w.append({"i": 1}, key="b")
    assert len(lmdbkit.Reader(path)) == 2


SLOW_FIRST_COMMIT = """
import sys, time, lmdbkit
from lmdbkit.writer import Writer
real = Writer._commit
def slow(self, **kw):  # the environment exists, its format record is not committed yet
    if self.count == 0 and not getattr(self, "_slowed", False):
        self._slowed = True
        print("ENV MADE", flush=True)
        time.sleep(float(sys.argv[2]))
    real(self, **kw)
Writer._commit = slow
with lmdbkit.Writer(sys.argv[1]) as w:
    w.append({"i": 0}, key="a")
    print("COMMITTED", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def test_reader_opened_before_a_new_writers_first_commit_waits_for_it(tmp_path):
    path = tmp_path / "db.lmdb"
    p = subprocess.Popen([sys.executable, "-c", SLOW_FIRST_COMMIT, str(path), "0.5", "2"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ENV MADE"
        assert (path / store.DATA_FILE).exists()
        with lmdbkit.Reader(path) as r:  # was NotADatabaseError: "an LMDB environment but not an lmdbkit database"
            assert r.meta["format"] == store.FORMAT_NAME and r.meta["complete"] is False
    finally:
        p.wait(timeout=30)
    with lmdbkit.Reader(path) as r:
        assert len(r) == 1


def test_reader_names_a_writer_whose_first_commit_never_comes(tmp_path, monkeypatch):
    path = tmp_path / "db.lmdb"
    p = subprocess.Popen([sys.executable, "-c", SLOW_FIRST_COMMIT, str(path), "60", "0"], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ENV MADE"
        real = lmdbkit.Reader._await_format_record
        monkeypatch.setattr(lmdbkit.Reader, "_await_format_record", lambda self: real(self, timeout=0.3))
        with pytest.raises(NotADatabaseError, match=rf"is being created by a writer \(pid {p.pid} on .*\) whose "
                                                    r"first commit has not landed after 0.3 s"):
            lmdbkit.Reader(path)
    finally:
        p.kill()
        p.wait()
    # a bare LMDB environment that no writer holds is still not ours, said at once
    with pytest.raises(NotADatabaseError, match="not an lmdbkit database"):
        lmdbkit.Reader(path)


def test_forked_child_cannot_write_through_inherited_writer(tmp_path):
    path = tmp_path / "db.lmdb"
    w = lmdbkit.Writer(path, commit_items=3)
    for i in range(5):
        w.append({"i": i}, key=f"A/{i}")
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: both ways of writing must be refused
        out = []
        try:
            w.append({"i": 99}, key="child")
            out.append("appended")
        except DatabaseBusyError as e:
            out.append("inherited:refused" if "forked child" in str(e) else f"inherited:{e}")
        try:
            lmdbkit.Writer(path, mode="append")
            out.append("opened")
        except DatabaseBusyError as e:
            out.append("new:refused" if f"pid {os.getppid()}" in str(e) else f"new:{e}")
        os.write(wfd, ",".join(out).encode())
        os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    said = os.read(r, 1000).decode()
    assert said == "inherited:refused,new:refused", said
    for i in range(5, 10):
        w.append({"i": i}, key=f"A/{i}")
    w.close()
    with lmdbkit.Reader(path) as rd:
        assert [s["i"] for s in rd] == list(range(10))


# -- truncated and damaged files ---------------------------------------------------------------------

def truncated_copy(src, dest, keep: int):
    shutil.copytree(src, dest)
    os.truncate(dest / "data.mdb", keep)
    return dest


def test_truncated_data_file_is_reported_never_sigbus(tmp_path):
    src = big_db(tmp_path / "src.lmdb")
    size = os.path.getsize(src / "data.mdb")
    for n, keep in enumerate([size - 4096, size // 2, size // 3, 3 * 4096, 8192 + 100, 5000, 100]):
        dest = truncated_copy(src, tmp_path / f"cut{n}.lmdb", keep)
        p = run_py("""
        import sys, lmdbkit
        try:
            r = lmdbkit.Reader(sys.argv[1])
            print("OPENED", sum(1 for _ in r))
        except lmdbkit.LmdbkitError as e:
            print(type(e).__name__, e)
        """, dest)
        assert p.returncode == 0, (keep, p.returncode, p.stderr[-500:])  # -7 was SIGBUS
        assert p.stdout.startswith("TruncatedDatabaseError") and "incomplete" in p.stdout, (keep, p.stdout)
        info = cli("info", dest)
        assert info.returncode == 1 and "incomplete" in info.stderr and "Traceback" not in info.stderr, (keep, info)
        ver = cli("verify", dest)
        assert ver.returncode == 1 and "DAMAGED" in ver.stdout and "incomplete" in ver.stdout, (keep, ver)
    with pytest.raises(TruncatedDatabaseError, match="copy it again"):
        lmdbkit.Reader(tmp_path / "cut0.lmdb")


def _damage(src, dest, rng, kind: str):
    shutil.copytree(src, dest)
    f = dest / "data.mdb"
    data = bytearray(f.read_bytes())
    pages = len(data) // 4096
    if kind == "flip":
        for _ in range(8):
            pos = int(rng.integers(2 * 4096, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "page":  # a whole page of garbage
        pg = int(rng.integers(2, pages))
        data[pg * 4096:(pg + 1) * 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    else:  # a page header rewritten (flags/bounds), what LMDB asserts on
        pg = int(rng.integers(2, pages))
        struct.pack_into("<HHHH", data, pg * 4096 + 8, *rng.integers(0, 1 << 16, 4).tolist())
    f.write_bytes(bytes(data))
    return dest


def test_verify_survives_any_damage_and_never_tracebacks(tmp_path):
    src = big_db(tmp_path / "src.lmdb", n=30, size=16 * 1024)
    rng = np.random.default_rng(7)
    outcomes = {}
    for t in range(30):
        kind = ("flip", "page", "header")[t % 3]
        dest = _damage(src, tmp_path / f"d{t}.lmdb", rng, kind)
        p = cli("verify", dest, "--json")
        assert p.returncode in (0, 1), (t, kind, p.returncode, p.stderr[-800:])
        assert "Traceback" not in p.stderr, (t, kind, p.stderr[-800:])
        rep = json.loads(p.stdout)
        assert rep["ok"] == (p.returncode == 0)
        outcomes[rep["ok"]] = outcomes.get(rep["ok"], 0) + 1
        # reading it in a child never kills that child with anything but... nothing: errors are LmdbkitErrors,
        # or LMDB's own abort, which only verify can survive (it isolates itself)
    assert outcomes.get(False, 0) >= 20, outcomes


def test_verify_reports_a_crash_of_its_checking_process(tmp_path, monkeypatch):
    """LMDB aborts on some damaged branch pages; verify's child dies, the parent reports it (exit 1)."""
    from lmdbkit import integrity
    src = big_db(tmp_path / "src.lmdb", n=4, size=1024)
    script = tmp_path / "aborts.py"
    script.write_text("import os, sys\n"
                      "print('{\"start\": {\"count\": 4, \"complete\": true}}', flush=True)\n"
                      "print(\"mdb.c:1234: Assertion 'IS_LEAF(mp)' failed in mdb_cursor_next()\", file=sys.stderr, flush=True)\n"
                      "os.abort()\n")
    fake = tmp_path / "python-that-aborts"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(integrity.sys, "executable", str(fake))
    rep = integrity.verify(src, progress=False)
    assert not rep.ok and rep.count == 4
    assert "crashed the checking process (SIGABRT)" in rep.problems[-1]["problem"]
    assert "IS_LEAF" in rep.problems[-1]["problem"]


def test_lmdb_errors_while_reading_are_lmdbkit_errors(tmp_path):
    src = big_db(tmp_path / "src.lmdb", n=30, size=16 * 1024)
    rng = np.random.default_rng(11)
    code = """
    import sys, lmdbkit
    try:
        r = lmdbkit.Reader(sys.argv[1])
        for i in range(len(r)):
            try:
                r[i]
            except lmdbkit.CorruptItemError:
                pass
        r.keys(); r.query(label=1); list(r.items())
        print("READ")
    except lmdbkit.LmdbkitError as e:
        print("LMDBKIT", type(e).__name__)
    """
    for t in range(54):  # seed 11, trial 50 rewrites a header so that reading the format record fails
        kind = ("flip", "page", "header")[t % 3]
        dest = _damage(src, tmp_path / f"d{t}.lmdb", rng, kind)
        if kind != "header" and t % 4:
            continue
        p = run_py(code, dest)
        if p.returncode == -signal.SIGABRT:
            continue  # LMDB's own assertion: only verify (isolated) survives that
        assert p.returncode == 0 and "Traceback" not in p.stderr, (t, p.returncode, p.stderr[-800:])


# -- bad input refused before it costs data --------------------------------------------------------

def test_overlong_keys_and_index_values_refused_before_queueing(tmp_path):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path, index_fields=("name",), commit_items=100) as w:
        for i in range(10):
            w.append({"x": np.zeros(4), "name": f"n{i}"}, key=f"good/{i}")
        with pytest.raises(KeyTooLongError, match=r"key 'aaa.*' is 600 bytes in UTF-8.*at most 511 bytes"):
            w.append({"x": np.zeros(4), "name": "n"}, key="a" * 600)
        with pytest.raises(KeyTooLongError, match="indexed field 'name'.*600 bytes"):
            w.append({"x": np.zeros(4), "name": "é" * 299}, key="long-name")
        with pytest.raises(KeyTooLongError, match="source"):
            w.append_source("s" * 512, [("in-source", {"x": np.zeros(4), "name": "n"})])
        assert len(w) == 10
        w.append({"x": np.zeros(4), "name": "last"}, key="good/10")
    with lmdbkit.Reader(path) as r:
        assert len(r) == 11 and r.keys() == [f"good/{i}" for i in range(11)]
        assert r.query(name="last") == [10]


def test_failed_commit_keeps_items_and_names_them(tmp_path):
    """A file-size limit makes LMDB's write fail mid-commit (as a full disk does): the error names every
    buffered item, they stay buffered, and a later commit writes them."""
    code = """
    import resource, signal, sys, numpy as np, lmdbkit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    w = lmdbkit.Writer(sys.argv[1], commit_items=10**6, commit_bytes=1 << 40, durable=False)
    for i in range(20):
        w.append({"x": np.full(16384, i, np.float32)}, key=f"k{i}")
    w.commit()
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.RLIM_INFINITY))
    for i in range(20, 60):
        w.append({"x": np.full(16384, i, np.float32)}, key=f"k{i}")
    try:
        w.commit()
        print("COMMITTED")
    except lmdbkit.CommitError as e:
        print("ERR", e.committed, len(e.not_committed), e.not_committed[0], e.not_committed[-1], "|", e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    w.commit()
    w.close()
    r = lmdbkit.Reader(sys.argv[1])
    print("FINAL", len(r), int(r[59]["x"][0]))
    """
    p = run_py(code, tmp_path / "db.lmdb")
    assert p.returncode == 0, p.stderr[-1000:]
    err = p.stdout.splitlines()[0]
    assert err.startswith("ERR 20 40 k20 k59"), p.stdout
    assert "20 items committed (intact)" in err and "'k20'" in err and "stay buffered" in err
    assert p.stdout.splitlines()[-1] == "FINAL 60 59"


@pytest.fixture
def tiny_fs(tmp_path):
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_says_so_and_loses_nothing_committed(tiny_fs):
    path = tiny_fs / "db.lmdb"
    w = lmdbkit.Writer(path, commit_items=8, durable=False)
    with pytest.raises(DiskFullError) as ei:
        for i in range(10_000):
            w.append({"x": np.full(16384, i, np.float32)}, key=f"k{i}")
    e = ei.value
    assert str(e).startswith(f"disk full at {path}: {e.committed} items committed (intact)")
    assert e.committed > 0 and len(e.not_committed) == 8 and "Free space" in str(e)
    first_lost = e.not_committed[0]
    with pytest.raises(DiskFullError):
        w.close()
    assert not (path / "metadata.json.tmp").exists()
    with lmdbkit.Reader(path) as r:
        assert len(r) == e.committed and r.index_of(first_lost) is None
        assert all(int(s["x"][0]) == i for i, s in enumerate(r))


def test_compact_onto_full_disk_leaves_no_partial_copy(tmp_path, tiny_fs):
    src = big_db(tmp_path / "src.lmdb", n=150)  # ~10 MB, the tmpfs holds 6
    p = cli("compact", src, tiny_fs / "copy.lmdb")
    assert p.returncode == 2 and "disk full" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tiny_fs / "copy.lmdb").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    if not ROOT:
        pytest.skip("a read-only bind mount needs root (root ignores chmod)")
    ro = tmp_path / "ro"
    ro.mkdir()
    rw = tmp_path / "rw"
    rw.mkdir()
    if subprocess.run(["mount", "--bind", str(rw), str(ro)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    yield rw, ro
    subprocess.run(["umount", "-l", str(ro)])


def test_read_only_media(read_only_dir):
    rw, ro = read_only_dir
    big_db(rw / "done.lmdb", n=5, size=1024)
    w = lmdbkit.Writer(rw / "open.lmdb")
    w.append({"i": 1})
    w.close(complete=False)  # as an interrupted writer leaves it
    with lmdbkit.Reader(ro / "done.lmdb") as r:  # finished: no lock file needed
        assert len(r) == 5
    with lmdbkit.Reader(ro / "open.lmdb") as r:  # unfinished: LMDB reads read-only media without its lock
        assert len(r) == 1 and not r.meta["complete"]
    with pytest.raises(ReadOnlyError, match="read-only"):
        lmdbkit.Writer(ro / "new.lmdb")
    with pytest.raises(ReadOnlyError, match="read-only"):
        lmdbkit.Writer(ro / "done.lmdb", mode="append")


def test_unfinished_database_in_a_folder_without_write_permission(tmp_path):
    if not ROOT or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (root without CAP_DAC_OVERRIDE meets file permissions)")
    path = tmp_path / "open.lmdb"
    w = lmdbkit.Writer(path)
    w.append({"i": 1})
    w.close(complete=False)
    for f in os.listdir(path):
        os.chmod(path / f, 0o444)
    os.chmod(path, 0o555)
    try:
        p = subprocess.run(["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override", sys.executable,
                            "-c", "import sys, lmdbkit\ntry:\n lmdbkit.Reader(sys.argv[1])\n"
                            "except lmdbkit.LmdbkitError as e: print(type(e).__name__, e)", str(path)],
                           capture_output=True, text=True)
        assert p.stdout.startswith("ReadOnlyError") and "not marked complete" in p.stdout, (p.stdout, p.stderr[-500:])
        assert "needs a writable folder" in p.stdout and str(path) in p.stdout
    finally:
        os.chmod(path, 0o755)


def test_reader_iterating_while_writer_in_this_process_grows_the_map(tmp_path):
    path = tmp_path / "db.lmdb"
    w = lmdbkit.Writer(path, commit_items=1)
    for i in range(20):
        w.append({"x": np.full(1000, i, np.float32)}, key=f"k{i}")
    w.commit()
    r = lmdbkit.Reader(path)
    seen = []
    for j, (k, s) in enumerate(r.items()):
        seen.append(int(s["x"][0]))
        if j == 3:  # the writer grows the map several times while the iteration is under way
            for i in range(20, 150):  # 130 MiB: the 64 MiB map doubles twice
                w.append({"x": np.full(1 << 18, i, np.float32)}, key=f"k{i}")
            assert w._h.env.info()["map_size"] >= 256 << 20
    assert seen == list(range(20))
    w.close()
    r.close()


def test_build_index_that_grows_the_map(tmp_path):
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path, commit_items=5000) as w:  # 64 MiB map, nearly full of items
        for i in range(30_000):
            w.append({"x": np.zeros(1700, np.uint8), "cat": f"c{i}-" + "x" * 200}, key=f"k{i}")
    with lmdbkit.Reader(path) as r:
        used = (r._handle().env.info()["last_pgno"] + 1) * 4096
    assert used > 60 << 20  # the index's pages will not fit: building it grows the map
    n = lmdbkit.build_index(path, "cat")
    assert n == 30_000
    with lmdbkit.Reader(path) as r:
        assert r.query(cat="c3-" + "x" * 200) == [3] and len(r.value_counts("cat")) == 30_000


def test_absurd_headers_are_corrupt_items_only(tmp_path):
    def item(shape, n=0, dcode=11, depth=0):
        fields = {"x": None}
        meta = 1
        for _ in range(depth):
            meta = [meta]
        if depth:
            fields["m"] = meta
        header = codec.msgpack.packb([None, fields, [["x", 0, dcode, 0, 0, n, shape]]], use_bin_type=True)
        import xxhash
        body = header + b"\0" * n
        return codec._PREFIX.pack(codec.MAGIC, 1, 0, len(header), xxhash.xxh3_64_intdigest(body)) + body
    bad = [item([0, 2**63 - 1]), item([2**40, 2**40], n=16), item([1] * 70, n=4), item([2], n=8, depth=600),
           item([3], n=4), item([-1], n=0), item([2**64 - 1], n=4)]
    for b in bad:
        with pytest.raises(CorruptItemError):
            codec.decode(b)
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(path) as w:
        for i in range(4):
            w.append({"x": np.zeros(4, np.float32)}, key=f"k{i}")
    from conftest import replace_stored
    replace_stored(path, 2, item([2**20, 2**20], n=16))
    from lmdbkit.dataset import LMDBDataset
    ds = LMDBDataset(path, prebatch=True)
    with pytest.raises(CorruptItemError, match="item 2"):
        ds.__getitems__([0, 1, 2, 3])


def test_values_the_codec_cannot_store_are_named(tmp_path):
    import torch
    path = tmp_path / "db.lmdb"
    with lmdbkit.Writer(os.fsencode(path), index_fields="label") as w:  # a bytes path; one field, not 5
        assert w.index_fields == ("label",)
        with pytest.raises(LmdbkitError, match="not valid Unicode"):
            w.append({"label": 1}, key="bad\udcff")
        with pytest.raises(EncodeError, match="'meta' device"):
            w.append({"t": torch.empty(3, device="meta"), "label": 1})
        with pytest.raises(EncodeError, match=r"field 'info.big': the integer 36893488147419103232 does not fit"):
            w.append({"info": {"big": 2**65}, "label": 1})
        with pytest.raises(EncodeError, match=r"metadata dict key \(1, 2\) is tuple"):
            w.append({"info": {(1, 2): "pair"}, "label": 1})
        with pytest.raises(EncodeError, match="nested more than 64 levels"):
            deep = 1
            for _ in range(600):
                deep = [deep]
            w.append({"deep": deep, "label": 1})
        w.append({"label": 1, "info": {1: "int keys read back"}}, key="ok")
    with lmdbkit.Reader(os.fsencode(path)) as r:
        assert len(r) == 1 and r.index_fields == ["label"] and r[0]["info"] == {1: "int keys read back"}


def test_bad_options_create_no_files(tmp_path):
    for kw in ({"map_size_gb": 1e9}, {"max_readers": 0}, {"map_size_gb": float("nan")}, {"commit_items": True}):
        p = tmp_path / f"x{len(os.listdir(tmp_path))}.lmdb"
        with pytest.raises(LmdbkitError, match=next(iter(kw))):
            lmdbkit.Writer(p, **kw)
        assert not p.exists(), kw
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    os.unlink(foreign / "lock.mdb")
    with pytest.raises(LmdbkitError, match="not an lmdbkit database"):
        lmdbkit.Reader(foreign)
    assert sorted(os.listdir(foreign)) == ["data.mdb"]


def test_verify_is_callable_after_its_module_is_imported(small_db):
    import lmdbkit.cli  # noqa: F401  (imports the integrity module)
    import lmdbkit.integrity  # noqa: F401
    rep = lmdbkit.verify(small_db, progress=False)
    assert rep.ok and rep.items_checked == 100
