"""Helper of bench/replication.sh (stdlib only, python3.11).

  sample  --work W --rebound BIN --item NAME --out F.jsonl
          once a second until SIGTERM: the item's newest recovery point and
          its age, the item's replication facts (if it reports any), and the
          VmRSS of every rebound/fio process whose command line names W.
  wait    --rebound BIN --item NAME --max-age S --timeout T
          poll until the newest recovery point is younger than S seconds;
          prints the seconds waited; exit 1 on timeout.
  fio     FILE.json      one line of the job's figures (for a quick look)
  report  --work W ...   the summary tables (from W/phases.tsv, W/fio/*.json,
          W/samples.jsonl, W/events.tsv)

The CLI is called as `BIN points ITEM --output json` and `BIN items show ITEM
--output json` with REBOUND_SERVER / REBOUND_TOKEN from the environment.
Fields that the item may or may not carry (`replication.state`,
`backlog_bytes`, `resync_bytes`, `eta_secs`) are read when present.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:?\d\d)?$"
)


def parse_time(s):
    """RFC 3339 (any number of fraction digits) -> seconds since the epoch."""
    import calendar

    m = RFC3339.match(s.strip()) if isinstance(s, str) else None
    if not m:
        return None
    y, mo, d, h, mi, se, frac, tz = m.groups()
    t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(se), 0, 0, 0))
    if frac:
        t += int(frac) / 10 ** len(frac)
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        tz = tz[1:].replace(":", "")
        t -= sign * (int(tz[:2]) * 3600 + int(tz[2:]) * 60)
    return t


def _run_cli(rebound, argv, timeout):
    try:
        p = subprocess.run([rebound, *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, None, "timeout"
    if p.returncode != 0:
        lines = [l.strip() for l in p.stderr.splitlines() if l.strip()]
        msg = next((l for l in lines if l.lower().startswith("error")), lines[0] if lines else "exit %d" % p.returncode)
        return p.returncode, None, msg[:200]
    try:
        return 0, json.loads(p.stdout), None
    except ValueError as e:
        return 0, None, "bad json: %s" % e


_FORM = {}


def cli_json(rebound, args, timeout=10):
    """`rebound ARGS` with JSON output. `--output` is a global option of some
    commands and a subcommand's option of others (`items --output json show
    X` today): try the forms in turn, remember the one that worked."""
    forms = [list(args) + ["--output", "json"]]
    for i in range(1, len(args)):
        forms.append(list(args[:i]) + ["--output", "json"] + list(args[i:]))
    key = tuple(args[:-1])
    order = list(range(len(forms)))
    if key in _FORM:
        order.remove(_FORM[key])
        order.insert(0, _FORM[key])
    first_err = None
    for i in order:
        rc, obj, err = _run_cli(rebound, forms[i], timeout)
        if err is None:
            _FORM[key] = i
            return obj, None
        first_err = first_err or err
        if rc != 2:  # not a usage error: the form was right, the call failed
            return None, err
    return None, first_err


def newest_point(points):
    """(time string, seconds since epoch, barrier_ns) of the newest point."""
    best = None
    for p in points or []:
        t = parse_time(p.get("time"))
        b = p.get("barrier_ns")
        key = (b / 1e9) if isinstance(b, (int, float)) and b else t
        if key is None:
            continue
        if best is None or key > best[0]:
            best = (key, p.get("time"), t, b)
    if best is None:
        return None
    return {"time": best[1], "time_s": best[2], "barrier_ns": best[3]}


# ---------------------------------------------------------------- processes


def proc_kind(argv):
    """A short name for a process of the lab or the benchmark, or None."""
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    a = argv[1:]
    if exe == "fio":
        return "fio (client)"
    if not exe.startswith("rebound"):
        return None
    if a[:2] == ["server", "run"]:
        return "server"
    if a[:1] == ["node"]:
        site = a[a.index("--site") + 1] if "--site" in a[:-1] else "?"
        return "node " + site
    if a[:2] == ["agent", "run"]:
        d = [x for x in a[2:] if not x.startswith("-")]
        if d:
            parts = d[0].rstrip("/").split("/")
            site = parts[-3] if len(parts) >= 3 else "?"
            return "agent %s@%s" % (parts[-1], site)
        return "agent"
    if a[:2] == ["agent", "export"]:
        return "plain export"
    if a[:1] == ["workload"]:
        return "workload"
    if a[:1] and a[0] in ("points", "items", "demo"):
        return None  # our own CLI calls, the demo driver
    return "rebound " + (a[0] if a else "")


def lab_processes(work):
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if work.encode() not in raw:
            continue
        argv = [x.decode(errors="replace") for x in raw.split(b"\0") if x]
        kind = proc_kind(argv)
        if kind is None:
            continue
        rss = None
        try:
            with open("/proc/%s/status" % d) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                        break
        except OSError:
            continue
        if rss is not None:
            out.append({"pid": int(d), "kind": kind, "rss_kb": rss})
    return out


# ---------------------------------------------------------------- sample


def cmd_sample(a):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    t0 = time.time()
    k = 0
    with open(a.out, "a", buffering=1) as out:
        while not stop:
            t = time.time()
            rec = {"t": round(t, 3)}
            pts, err = cli_json(a.rebound, ["points", a.item])
            if err:
                rec["points_error"] = err
            else:
                np_ = newest_point(pts)
                rec["points"] = len(pts) if isinstance(pts, list) else None
                if np_:
                    rec["point_time"] = np_["time"]
                    ref = np_["time_s"] if np_["time_s"] is not None else (np_["barrier_ns"] or 0) / 1e9
                    rec["point_age"] = round(t - ref, 3)
                    if np_["barrier_ns"]:
                        rec["barrier_age"] = round(t - np_["barrier_ns"] / 1e9, 3)
            item, err = cli_json(a.rebound, ["items", "show", a.item])
            if err:
                rec["item_error"] = err
            elif isinstance(item, dict):
                rep = item.get("replication")
                if isinstance(rep, dict):
                    for f in ("state", "backlog_bytes", "resync_bytes", "eta_secs"):
                        if f in rep:
                            rec[f] = rep[f]
                if "rpo_seconds" in item:
                    rec["rpo_seconds"] = item["rpo_seconds"]
                st = item.get("state")
                if isinstance(st, dict):
                    rec["item_state"] = "/".join(str(v) for v in st.values())
                elif st is not None:
                    rec["item_state"] = str(st)
            rec["procs"] = lab_processes(a.work)
            out.write(json.dumps(rec) + "\n")
            k += 1
            nxt = t0 + k * a.interval
            while not stop and time.time() < nxt:
                time.sleep(min(0.1, max(0.0, nxt - time.time())))
            if time.time() > nxt + a.interval:  # fell behind: do not burst
                t0, k = time.time(), 0


# ---------------------------------------------------------------- wait


def cmd_wait(a):
    start = time.time()
    last = None
    while True:
        pts, err = cli_json(a.rebound, ["points", a.item])
        now = time.time()
        if not err:
            np_ = newest_point(pts)
            if np_ and np_["time_s"] is not None:
                last = now - np_["time_s"]
                if last < a.max_age:
                    print("%.1f" % (now - start))
                    return 0
        if now - start > a.timeout:
            print("%.1f" % (now - start))
            print(
                "replication_stats wait: newest point still %s s old after %.0f s"
                % ("?" if last is None else "%.1f" % last, now - start),
                file=sys.stderr,
            )
            return 1
        time.sleep(1)


# ---------------------------------------------------------------- fio


def load_fio(path):
    """The JSON object of a fio run (the nbd engine may print a line first)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    i = text.find("\n{")
    i = 0 if text.startswith("{") else (i + 1 if i >= 0 else -1)
    if i < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[i:])[0]
    except ValueError:
        return None


def fio_figures(path):
    j = load_fio(path)
    if not j or not j.get("jobs"):
        return None
    job = j["jobs"][0]
    w = job.get("write", {})
    clat = w.get("clat_ns", {})
    pct = {float(k): v for k, v in (clat.get("percentile") or {}).items()}

    def p(q):
        v = pct.get(q)
        return None if v is None else v / 1e6

    return {
        "iops": w.get("iops", 0.0),
        "mbps": w.get("bw_bytes", 0) / 1e6,
        "p50": p(50.0),
        "p99": p(99.0),
        "p999": p(99.9),
        "max": clat.get("max", 0) / 1e6 if clat.get("max") is not None else None,
        "mean": clat.get("mean", 0) / 1e6 if clat.get("mean") is not None else None,
        "ios": w.get("total_ios"),
        "error": job.get("error", 0),
        "runtime_s": w.get("runtime", 0) / 1000,
    }


def cmd_fio(a):
    f = fio_figures(a.file)
    if not f:
        print("no fio JSON in %s" % a.file)
        return 1
    print("%.0f IOPS, %.1f MB/s, clat p50 %s p99 %s p99.9 %s max %s ms%s" % (
        f["iops"], f["mbps"], fmt(f["p50"], "{:.3f}"), fmt(f["p99"], "{:.3f}"), fmt(f["p999"], "{:.3f}"),
        fmt(f["max"], "{:.1f}"), "; fio error %s" % f["error"] if f["error"] else ""))
    return 0


# ---------------------------------------------------------------- report


def read_tsv(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(line.rstrip("\n").split("\t"))
    except OSError:
        pass
    return rows


def read_samples(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def pctl(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(v, spec="{:.2f}", none="—"):
    return none if v is None else spec.format(v)


def ratio(p, q, spec="{:.2f}×"):
    if p is None or q is None or q == 0:
        return "—"
    return spec.format(p / q)


def human_bytes(b):
    if b is None:
        return "—"
    for u in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or u == "GiB":
            return ("%d %s" % (b, u)) if u == "B" else ("%.1f %s" % (b, u))
        b /= 1024


def table(head, rows):
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r)).rstrip() for r in [head] + rows]
    return "\n".join(lines)


def window(samples, start, end):
    return [s for s in samples if start <= s["t"] <= end]


def ages(samples):
    return [s["point_age"] for s in samples if "point_age" in s]


def age_line(label, ss):
    xs = ages(ss)
    errs = sum(1 for s in ss if "points_error" in s)
    if not xs:
        return "  %-28s no recovery point seen (%d samples, %d errors)" % (label, len(ss), errs)
    return "  %-28s median %6.1f s   p99 %6.1f s   max %6.1f s   (%d samples%s)" % (
        label,
        statistics.median(xs),
        pctl(xs, 99),
        max(xs),
        len(xs),
        ", %d CLI errors" % errs if errs else "",
    )


def cmd_report(a):
    W = a.work
    phases = {r[0]: (float(r[1]), float(r[2])) for r in read_tsv(os.path.join(W, "phases.tsv")) if len(r) >= 3}
    events = read_tsv(os.path.join(W, "events.tsv"))
    samples = read_samples(os.path.join(W, "samples.jsonl"))
    fiod = os.path.join(W, "fio")

    def fig(name):
        return fio_figures(os.path.join(fiod, name + ".json"))

    N = a.rpo_secs
    out = []
    P = out.append
    P("")
    P("=" * 78)
    P("rebound replication benchmark — %s" % time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for line in (a.header or "").split("\\n"):
        if line:
            P("# " + line)
    P("=" * 78)

    # (a)
    P("")
    P("(a) 4 KiB random writes, --rate=%s, iodepth 16, %s s" % (a.write_rate, a.duration))
    rows = []
    fp, fq = fig("a-plain"), fig("a-protected")
    for label, f in (("plain", fp), ("protected", fq)):
        if f is None:
            rows.append([label, "failed", "", "", "", "", "", ""])
            continue
        rows.append([label, fmt(f["iops"], "{:.0f}"), fmt(f["mbps"], "{:.1f}"), fmt(f["p50"], "{:.3f}"),
                     fmt(f["p99"], "{:.3f}"), fmt(f["p999"], "{:.3f}"), fmt(f["max"], "{:.1f}"),
                     "" if not f["error"] else "fio error %s" % f["error"]])
    if fp and fq:
        rows.append(["protected/plain", ratio(fq["iops"], fp["iops"]), ratio(fq["mbps"], fp["mbps"]),
                     ratio(fq["p50"], fp["p50"], "{:.1f}×"), ratio(fq["p99"], fp["p99"], "{:.1f}×"),
                     ratio(fq["p999"], fp["p999"], "{:.1f}×"), ratio(fq["max"], fp["max"], "{:.1f}×"), ""])
    P(table(["target", "IOPS", "MB/s", "clat p50 ms", "p99 ms", "p99.9 ms", "max ms", ""], rows))
    P("newest recovery point age (now − point time), sampled every second:")
    if "a-protected" in phases:
        P(age_line("protected, during the run", window(samples, *phases["a-protected"])))
    if "a-plain" in phases:
        P(age_line("(during the plain run)", window(samples, *phases["a-plain"])))
    if "a-protected" in phases:
        st = [s["state"] for s in window(samples, *phases["a-protected"]) if "state" in s]
        bl = [s["backlog_bytes"] for s in window(samples, *phases["a-protected"]) if "backlog_bytes" in s]
        if st or bl:
            P("  replication states seen: %s; max backlog %s" % (", ".join(sorted(set(st))) or "—",
                                                            human_bytes(max(bl)) if bl else "—"))
        else:
            P("  (the item reports no replication state/backlog in this build)")

    # (b)
    P("")
    P("(b) unlimited rate, %s s each" % a.rate_secs)
    rows = []
    for job, label in (("b-rand4k", "randwrite 4k qd16"), ("b-seq1m", "write 1m seq qd4")):
        fp, fq = fig(job + "-plain"), fig(job + "-protected")
        rows.append([
            label,
            fmt(fp and fp["iops"], "{:.0f}"), fmt(fp and fp["mbps"], "{:.1f}"),
            fmt(fq and fq["iops"], "{:.0f}"), fmt(fq and fq["mbps"], "{:.1f}"),
            ratio(fq and fq["iops"], fp and fp["iops"]),
            fmt(fp and fp["p99"], "{:.2f}"), fmt(fq and fq["p99"], "{:.2f}"),
        ])
    P(table(["job", "plain IOPS", "plain MB/s", "prot IOPS", "prot MB/s", "prot/plain", "p99 ms plain", "p99 ms prot"], rows))
    for job in ("b-rand4k", "b-seq1m"):
        k = job + "-protected"
        if k in phases:
            P(age_line("point age, %s prot" % job[2:], window(samples, *phases[k])))

    # (c)
    P("")
    P("(c) outage of the recovery site's node for %s s during (a)'s load on the protected machine" % a.outage)
    ev = {r[0]: r[1:] for r in events}
    fc = fig("c-protected")
    fa = fig("a-protected")
    if fc:
        rows = [["protected + outage", fmt(fc["iops"], "{:.0f}"), fmt(fc["mbps"], "{:.1f}"), fmt(fc["p50"], "{:.3f}"),
                 fmt(fc["p99"], "{:.3f}"), fmt(fc["p999"], "{:.3f}"), fmt(fc["max"], "{:.1f}")]]
        if fa:
            rows.append(["vs (a) protected", ratio(fc["iops"], fa["iops"]), ratio(fc["mbps"], fa["mbps"]),
                         ratio(fc["p50"], fa["p50"], "{:.1f}×"), ratio(fc["p99"], fa["p99"], "{:.1f}×"),
                         ratio(fc["p999"], fa["p999"], "{:.1f}×"), ratio(fc["max"], fa["max"], "{:.1f}×")])
        P(table(["run", "IOPS", "MB/s", "clat p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows))
    else:
        P("  fio run failed or missing")
    kill_t = float(ev["node-killed"][0]) if "node-killed" in ev else None
    rest_t = float(ev["node-restarted"][0]) if "node-restarted" in ev else None
    c0 = phases.get("c-protected", (None, None))[0]
    cend = phases.get("c-catchup", phases.get("c-protected", (None, None)))[1]
    if kill_t and c0:
        P("  recovery node (pid %s) SIGKILLed at +%.1f s; restarted%s at +%s s"
          % (ev["node-killed"][1] if len(ev["node-killed"]) > 1 else "?", kill_t - c0,
             (" (pid %s)" % ev["node-restarted"][1]) if rest_t and len(ev["node-restarted"]) > 1 else "",
             "%.1f" % (rest_t - c0) if rest_t else "never"))
    if c0 and cend:
        cs = window(samples, c0, cend)
        st = []
        for s in cs:
            if "state" in s and (not st or st[-1] != s["state"]):
                st.append(s["state"])
        bl = [s["backlog_bytes"] for s in cs if "backlog_bytes" in s]
        P("  replication states seen (in order): %s" % (" → ".join(st) if st else "— (not reported by this build)"))
        P("  max backlog: %s" % (human_bytes(max(bl)) if bl else "— (not reported by this build)"))
        rs = [s["resync_bytes"] for s in cs if isinstance(s.get("resync_bytes"), (int, float))]
        if rs:
            P("  max resync: %s" % human_bytes(max(rs)))
        P(age_line("point age, whole phase", cs))
        if kill_t:
            P(age_line("point age, node down", window(samples, kill_t, rest_t or cend)))
        if rest_t:
            after = [s for s in cs if s["t"] >= rest_t and "point_age" in s]
            caught = next((s for s in after if s["point_age"] < 2 * N), None)
            if caught:
                P("  catch-up: %.1f s from the node's restart until the point age was < 2×RPO = %d s"
                  % (caught["t"] - rest_t, 2 * N))
            else:
                P("  catch-up: NOT reached: the point age stayed ≥ %d s for the %.0f s sampled after the restart"
                  % (2 * N, (after[-1]["t"] - rest_t) if after else 0))
            if "c-catchup" in phases and "c-protected" in phases:
                P("  (fio stopped at +%.1f s; sampling went on until catch-up or the timeout)"
                  % (phases["c-protected"][1] - c0))
        # A compact timeline, one row every TL seconds.
        step = max(1, int(a.timeline_step))
        tl = []
        last = None
        for s in cs:
            if last is not None and s["t"] - last < step - 0.5:
                continue
            last = s["t"]
            mark = ""
            if kill_t and s["t"] >= kill_t and (not rest_t or s["t"] < rest_t):
                mark = "node down"
            row = ["+%.0f" % (s["t"] - c0), fmt(s.get("point_age"), "{:.1f}"), s.get("state", "—"),
                   human_bytes(s.get("backlog_bytes")) if "backlog_bytes" in s else "—"]
            if rs:
                row.append(human_bytes(s.get("resync_bytes")) if "resync_bytes" in s else "—")
            row += [fmt(s.get("eta_secs"), "{}"), (s.get("points_error") or s.get("item_error") or "")[:40], mark]
            tl.append(row)
        if tl:
            head = ["t", "point age s", "state", "backlog"] + (["resync"] if rs else []) + ["eta s", "error", ""]
            P("  timeline (every %d s):" % step)
            P("\n".join("    " + l.rstrip() for l in table(head, tl).splitlines()))

    # settle waits
    waits = [r for r in events if r[0] == "settle"]
    if waits:
        P("")
        P("waits for the newest point to be < 2×RPO old before each run:")
        P("  " + ", ".join("%s %s s%s" % (r[1], r[2], "" if len(r) < 4 or r[3] == "ok" else " (timed out)") for r in waits))

    # memory
    P("")
    P("resident memory (VmRSS), max per process kind over the whole run (sampled every second):")
    mx = {}
    for s in samples:
        for p in s.get("procs", []):
            k = p["kind"]
            mx.setdefault(k, [0, set()])
            mx[k][0] = max(mx[k][0], p["rss_kb"])
            mx[k][1].add(p["pid"])
    rows = [[k, "%.1f" % (v[0] / 1024), str(len(v[1]))] for k, v in sorted(mx.items())]
    P(table(["process", "max RSS MiB", "pids seen"], rows) if rows else "  (no samples)")
    P("")
    for f, what in (("points_error", "rebound points"), ("item_error", "rebound items show")):
        errs = [s[f] for s in samples if f in s]
        P("%d samples; %s failed in %d%s" % (len(samples), what, len(errs), "" if not errs else " (e.g. %s)" % errs[0]))
    print("\n".join(out))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--work", required=True)
    s.add_argument("--rebound", required=True)
    s.add_argument("--item", default="vm1")
    s.add_argument("--out", required=True)
    s.add_argument("--interval", type=float, default=1.0)
    w = sub.add_parser("wait")
    w.add_argument("--rebound", required=True)
    w.add_argument("--item", default="vm1")
    w.add_argument("--max-age", type=float, required=True)
    w.add_argument("--timeout", type=float, required=True)
    f = sub.add_parser("fio")
    f.add_argument("file")
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--rpo-secs", type=int, default=2)
    r.add_argument("--duration", default="?")
    r.add_argument("--rate-secs", default="?")
    r.add_argument("--outage", default="?")
    r.add_argument("--write-rate", default="50m")
    r.add_argument("--timeline-step", type=float, default=5)
    r.add_argument("--header", default="")
    a = ap.parse_args()
    return {"sample": cmd_sample, "wait": cmd_wait, "fio": cmd_fio, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
