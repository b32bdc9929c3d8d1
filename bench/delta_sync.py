"""Driver of bench/delta-sync.sh. Prints one table and writes results.json."""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SEG = 64 << 20
LEAF = 4096
# 12 segments: half random data, a third holes, a sixth compressible text.
PATTERN = "RRHTRRHRHTRH"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def gen_image(path, size):
    text = b"".join(
        f"{i:08d} the quick brown fox jumps over the lazy dog; rebound delta sync bench line\n".encode()
        for i in range(20000)
    )
    with open(path, "wb") as f:
        for i, off in enumerate(range(0, size, SEG)):
            kind = PATTERN[i % len(PATTERN)]
            n = min(SEG, size - off)
            if kind == "H":
                continue
            f.seek(off)
            if kind == "R":
                f.write(os.urandom(n))
            else:
                reps = n // len(text) + 1
                f.write((text * reps)[:n])
        f.truncate(size)


def mutate(src, dst, size, fraction, seed):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    leaves = size // LEAF
    rng = random.Random(seed)
    picked = rng.sample(range(leaves), int(leaves * fraction))
    picked.sort()
    with open(dst, "r+b") as f:
        for leaf in picked:
            f.seek(leaf * LEAF)
            f.write(os.urandom(LEAF))
    return len(picked) * LEAF


def drop_caches(enabled):
    if not enabled:
        return
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(cmd, **kw):
    """Run cmd under GNU time; returns (stdout, wall, cpu, peak_kib)."""
    out = tempfile.NamedTemporaryFile(delete=False)
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%e %U %S %M"] + cmd, capture_output=True, **kw)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr.decode()[-2000:]}")
    e, u, s, m = open(out.name).read().split()[-4:]
    os.unlink(out.name)
    return p.stdout.decode(), wall, float(u) + float(s), int(m)


class Daemon:
    """A server under GNU time, stopped with SIGTERM to collect its usage."""

    def __init__(self, cmd):
        self.out = tempfile.NamedTemporaryFile(delete=False).name
        self.p = subprocess.Popen(
            ["/usr/bin/time", "-o", self.out, "-f", "%e %U %S %M"] + cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self):
        # time's child is the server: signal it, not time itself.
        for child in open(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read().split():
            os.kill(int(child), signal.SIGTERM)
        self.p.wait(timeout=60)
        fields = open(self.out).read().split()
        os.unlink(self.out)
        return float(fields[-3]) + float(fields[-2]), int(fields[-1])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run_rebound(args, work, src, base, extra=()):
    srv = os.path.join(work, "srv")
    dst = os.path.join(srv, "dst.img")
    subprocess.run(["cp", "--sparse=always", base, dst], check=True)
    tok = os.path.join(work, "token")
    port = free_port()
    d = Daemon([args.rebound, "sync-server", "--listen", f"127.0.0.1:{port}", "--root", srv, "--token-file", tok])
    wait_port(port)
    drop_caches(args.drop)
    out, wall, cpu, mem = timed(
        [args.rebound, "sync", "--no-resume", "--output", "json", "--token-file", tok, *extra, src,
         f"rebound://127.0.0.1:{port}/dst.img"]
    )
    scpu, smem = d.stop()
    r = json.loads(out)
    assert r["identical"], r
    return dict(wall=wall, cpu=cpu + scpu, mem_client=mem, mem_server=smem,
                wire=r["wire_bytes_sent"] + r["wire_bytes_received"], leaves=r["leaves_differing"])


def run_rsync(args, work, src, base):
    srv = os.path.join(work, "srv")
    dst = os.path.join(srv, "dst.img")
    subprocess.run(["cp", "--sparse=always", base, dst], check=True)
    port = free_port()
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"use chroot = no\nuid = root\ngid = root\n[m]\n path = {srv}\n read only = no\n")
    d = Daemon(["rsync", "--daemon", "--no-detach", f"--port={port}", f"--config={conf}", "--address=127.0.0.1"])
    wait_port(port)
    drop_caches(args.drop)
    out, wall, cpu, mem = timed(["rsync", "--inplace", "--no-whole-file", "--stats", src, f"rsync://127.0.0.1:{port}/m/dst.img"])
    scpu, smem = d.stop()
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return dict(wall=wall, cpu=cpu + scpu, mem_client=mem, mem_server=smem, wire=sent + recv)


def run_local(args, cmd):
    drop_caches(args.drop)
    _, wall, cpu, mem = timed(cmd)
    return dict(wall=wall, cpu=cpu, mem_client=mem, mem_server=0, wire=0)


def median_run(n, fn):
    """Run `fn` n times; the run with the median wall time (the disk of a
    shared VM varies by 2x between identical runs)."""
    runs = sorted((fn() for _ in range(n)), key=lambda r: r["wall"])
    return runs[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebound", required=True)
    a = ap.parse_args()
    a.drop = os.environ.get("DROP_CACHES", "1") != "0" and os.geteuid() == 0
    a.repeat = max(1, int(os.environ.get("REPEAT", "1")))
    size = int(float(os.environ.get("SIZE_GIB", "8")) * (1 << 30))
    work = os.environ.get("WORK") or tempfile.mkdtemp(prefix="rebound-bench.", dir="/var/tmp")
    os.makedirs(os.path.join(work, "srv"), exist_ok=True)
    with open(os.path.join(work, "token"), "w") as f:
        f.write("bench-token-" + os.urandom(8).hex() + "\n")
    base = os.path.join(work, "base.img")
    log(f"generating a {size >> 20} MiB image in {work}")
    gen_image(base, size)
    rows = []
    try:
        for pct in [int(p) for p in os.environ.get("PCTS", "1,10").split(",")]:
            src = os.path.join(work, f"src{pct}.img")
            changed = mutate(base, src, size, pct / 100, seed=pct)
            log(f"{pct}% changed: {changed >> 20} MiB in 4 KiB blocks")
            res = {}
            skip_rsync = os.environ.get("SKIP_RSYNC") == "1"
            n = a.repeat
            res["rebound"] = median_run(n, lambda: run_rebound(a, work, src, base))
            if not skip_rsync:
                res["rsync"] = run_rsync(a, work, src, base)
            dst = os.path.join(work, "dst-local.img")
            qemu = ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, dst]

            def run_qemu(cmd):
                # A fresh copy of the old disk each time, as for the others.
                subprocess.run(["cp", "--sparse=always", base, dst], check=True)
                return run_local(a, cmd)

            res["qemu-img convert -n"] = median_run(n, lambda: run_qemu(qemu))
            # qemu-img leaves its writes in the page cache (no flush); rebound
            # ends with its data fsynced, so also time qemu-img plus fdatasync.
            qemu_sync = ["sh", "-c", " ".join(qemu) + f" && sync --data {dst}"]
            res["qemu-img + fdatasync"] = median_run(n, lambda: run_qemu(qemu_sync))
            os.unlink(dst)
            res["rebound --full"] = median_run(n, lambda: run_rebound(a, work, src, base, extra=("--full",)))
            res["cat src dst (floor)"] = median_run(
                n, lambda: run_local(a, ["sh", "-c", f"cat {src} {base} > /dev/null"]))
            rows.append((pct, changed, res))
            os.unlink(src)
        report(a, size, rows)
    finally:
        # Last: deleting large files is slow where the filesystem discards.
        if os.environ.get("KEEP") != "1":
            log(f"removing {work}")
            shutil.rmtree(work, ignore_errors=True)


def report(a, size, rows):
    mib = lambda b: b / (1 << 20)
    print(f"\ndisk {size >> 30} GiB ({size >> 20} MiB): half random, a third holes, a sixth text; page cache dropped before each run: {a.drop}; "
          f"median of {a.repeat} run(s) per tool (rsync: 1)")
    print(f"{'changed':>8} {'tool':<22} {'wall s':>8} {'cpu s':>8} {'wire MiB':>9} {'peak MiB (client/server)':>25}")
    summary = []
    for pct, changed, res in rows:
        for tool, r in res.items():
            print(f"{pct:>7}% {tool:<22} {r['wall']:>8.2f} {r['cpu']:>8.2f} {mib(r['wire']):>9.1f} "
                  f"{r['mem_client'] / 1024:>12.0f} / {r['mem_server'] / 1024:<10.0f}")
        rb, rs = res["rebound"], res.get("rsync")
        ratios = dict(
            changed_pct=pct,
            changed_mib=round(mib(changed), 1),
            rsync_over_rebound=round(rs["wall"] / rb["wall"], 2) if rs else None,
            rebound_over_floor=round(rb["wall"] / res["cat src dst (floor)"]["wall"], 2),
            wire_over_changed=round(rb["wire"] / changed, 3),
            full_over_qemu=round(res["rebound --full"]["wall"] / res["qemu-img convert -n"]["wall"], 2),
            full_over_qemu_fdatasync=round(res["rebound --full"]["wall"] / res["qemu-img + fdatasync"]["wall"], 2),
            full_wire_mib=round(mib(res["rebound --full"]["wire"]), 1),
            rebound_peak_mib=round(max(rb["mem_client"], rb["mem_server"]) / 1024, 1),
        )
        summary.append(ratios)
        print("  ratios:", json.dumps(ratios))
    with open("bench/out-delta-sync.json", "w") as f:
        json.dump(dict(size=size, rows=[(p, c, r) for p, c, r in rows], ratios=summary), f, indent=1)


if __name__ == "__main__":
    main()
