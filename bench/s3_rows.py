#!/usr/bin/env python3
"""Save/load GB/s on a local S3 server: dcpp's S3 store vs PyTorch DCP's fsspec path (s3fs).

    $(scripts/venv-path)/bin/python bench/s3_rows.py BUILD_DIR [MB]
    $(scripts/venv-path)/bin/python bench/s3_rows.py [--build BUILD_DIR] [--mb MB] [--dir SCRATCH]
                                                     [--server rclone|moto]

The second form is how `dcpp bench` runs it (with --dir); the build defaults to DCPP_BUILD_DIR,
else the repository's build/. Without bench/dcpp_s3_bench in the build, only the PyTorch and
server rows are measured and one row says why dcpp's are missing.

BUILD_DIR was configured with -DDCPP_BUILD_BENCHMARKS=ON (it holds bench/dcpp_s3_bench). Every
case gets a fresh server on loopback, started here and stopped after:
  rclone (the default): `rclone serve s3` (gofakes3) over a directory under SCRATCH (or a
      temporary one). A ranged GET reads its range from the object's file, as S3 serves a range.
  moto: moto's server, objects in memory. Every ranged GET copies the whole object before it
      slices the range (moto/s3/responses.py), so a client that reads one object in several
      ranges (dcpp: 8 MiB pieces in parallel, as S3's guidance advises) pays the object's size
      per request: measured here, one 256 MiB object read in 8 MiB ranges ran at 0.06 GB/s
      against 0.94 for one whole-object GET. Its rows measure that server, not the client.
The state: 8 float32 tensors [rows, 4096], MB MiB in all (default 256).

Prints one JSON row per case: {"case", "figures", "target", "pass"}. dcpp's rows pass when they
reach the best PyTorch fsspec figure of the same run; "raw" rows are the S3 store alone moving the
same bytes as parallel whole objects (what the server takes through this client), and the
"server" row is moto's own ingest/egress measured with a plain HTTP client (the bound).
"""
import contextlib
import http.client
import shutil
import tempfile
import json
import os
import socket
import subprocess
import sys
import threading
import time

VENV_BIN = os.path.dirname(sys.executable)
KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_REGION": "us-east-1"}


FAKE_AUTH = ("AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, "
             "SignedHeaders=host, Signature=0")


def auth_headers(endpoint, method, path, kind):
    """moto refuses anonymous GETs but checks no signature; rclone checks SigV4, so its requests
    are signed by botocore, the payload left unsigned (hashing it would be timed too)."""
    if kind == "moto":
        return {"Authorization": FAKE_AUTH}
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    class UnsignedPayload(SigV4Auth):
        def payload(self, request):
            return "UNSIGNED-PAYLOAD"

    r = AWSRequest(method=method, url=endpoint + path,
                   headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    UnsignedPayload(Credentials("testing", "testing"), "s3", "us-east-1").add_auth(r)
    return dict(r.headers.items())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(kind, scratch):
    """A fresh S3 server of `kind` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    objects = None
    if kind == "rclone":
        objects = tempfile.mkdtemp(prefix="dcpp-s3-bench-", dir=scratch)
        argv = [os.path.join(VENV_BIN, "rclone"), "serve", "s3", objects, "--addr",
                f"127.0.0.1:{port}", "--auth-key", "testing,testing", "--config", "/dev/null"]
    else:
        argv = [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    # The server's own log (rclone logs its internal errors at ERROR), read by dcpp_case.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    server.log = log
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if objects:
            shutil.rmtree(objects, ignore_errors=True)
        log.close()


def server_errors():
    """The ERROR lines the running server logged so far (rclone's internal failures)."""
    server.log.flush()
    server.log.seek(0)
    return [line.rstrip() for line in server.log if " ERROR " in line]


# Cases rerun because the server failed on its own side (see dcpp_case).
SERVER_FAULTS = []


def dcpp_case(build, mb, ranks, threads, kind, scratch, tries=2):
    """One run of dcpp_s3_bench on a fresh server. rclone's VFS sometimes loses the temporary
    file of a multipart upload while other uploads complete in the same directory, and then
    answers every completion of that upload with HTTP 500 (its log says "Dir.Rename error: file
    does not exist"); dcpp's save fails as it must. Such a run, with the server's own ERROR lines
    as the evidence, is reported on stderr and in the row and run once more on a new server; any
    other failure ends the benchmark."""
    for attempt in range(tries):
        with server(kind, scratch) as endpoint:
            env = dict(os.environ, AWS_ENDPOINT_URL_S3=endpoint, **KEY)
            argv = [os.path.join(build, "bench", "dcpp_s3_bench"), "s3://bench/ck", str(mb),
                    str(ranks), str(threads)]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode == 0:
                return json.loads(done.stdout)
            # What dcpp said is the only account of the failure: pass it on before failing.
            errors = server_errors()
            sys.stderr.write(f"{' '.join(argv)} ({kind} at {endpoint}) failed with status "
                             f"{done.returncode}:\n{done.stderr}\n")
            if errors:
                sys.stderr.write(f"{kind} logged:\n" + "\n".join(errors[:10]) + "\n")
            if not errors or " 500 " not in done.stderr or attempt + 1 == tries:
                done.check_returncode()
            SERVER_FAULTS.append({"ranks": ranks, "threads": threads,
                                  "server_error": errors[0][-200:]})


def torch_case(mb, threads, kind, scratch):
    import s3fs
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    rows = (mb << 20) // (8 * 4096 * 4)
    sd = {f"t{i}": (torch.arange(rows * 4096, dtype=torch.float32).reshape(rows, 4096) + i) % 1000
          for i in range(8)}
    nbytes = sum(t.numel() * 4 for t in sd.values())
    with server(kind, scratch) as endpoint:
        opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**opts).mkdir("bench")
        t0 = time.perf_counter()
        dcp.save(sd, storage_writer=FsspecWriter("s3://bench/ck", thread_count=threads, **opts))
        save_s = time.perf_counter() - t0
        dst = {k: torch.zeros_like(v) for k, v in sd.items()}
        t0 = time.perf_counter()
        dcp.load(dst, storage_reader=FsspecReader("s3://bench/ck", **opts))
        load_s = time.perf_counter() - t0
        assert all(torch.equal(sd[k], dst[k]) for k in sd)
    return {"bytes": nbytes, "save_s": save_s, "load_s": load_s}


def server_bound(mb, streams, kind, scratch):
    """The server's own rate: `streams` plain HTTP PUTs then GETs of mb/streams MiB each (moto
    takes them unsigned; rclone is given a SigV4 signature by botocore)."""
    blob = b"x" * ((mb << 20) // streams)
    with server(kind, scratch) as endpoint:
        port = int(endpoint.rsplit(":", 1)[1])

        def req(method, path, body=None):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            c.request(method, path, body=body, headers=auth_headers(endpoint, method, path, kind))
            resp = c.getresponse()
            data = resp.read()
            c.close()
            assert resp.status == 200, (method, path, resp.status)
            return data

        req("PUT", "/raw")

        def run(fn):
            ts = [threading.Thread(target=fn, args=(i,)) for i in range(streams)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return time.perf_counter() - t0

        put_s = run(lambda i: req("PUT", f"/raw/o{i}", blob))
        got = [0] * streams

        def get(i):
            got[i] = len(req("GET", f"/raw/o{i}"))

        get_s = run(get)
        assert sum(got) == len(blob) * streams
    return {"bytes": len(blob) * streams, "put_s": put_s, "get_s": get_s}


def gbs(nbytes, s):
    return round(nbytes / s / 1e9, 3)


def parse_args(argv):
    """(build dir, MiB, scratch dir, server kind, rounds): positional BUILD_DIR [MB], or --build /
    --mb / --dir / --server / --rounds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = os.environ.get("DCPP_BUILD_DIR", os.path.join(root, "build"))
    mb, scratch, rounds = 256, None, 3
    kind = "rclone" if os.path.exists(os.path.join(VENV_BIN, "rclone")) else "moto"
    positional = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--build", "--mb", "--dir", "--server", "--rounds") and i + 1 < len(argv):
            if argv[i] == "--build":
                build = argv[i + 1]
            elif argv[i] == "--mb":
                mb = int(argv[i + 1])
            elif argv[i] == "--dir":
                scratch = argv[i + 1]
            elif argv[i] == "--server":
                kind = argv[i + 1]
            else:
                rounds = int(argv[i + 1])
            i += 2
            continue
        positional.append(argv[i])
        i += 1
    if positional:
        build = positional[0]
    if len(positional) > 1:
        mb = int(positional[1])
    if kind not in ("rclone", "moto"):
        sys.exit(f"s3_rows.py: --server is rclone or moto, not {kind}")
    if scratch:
        os.makedirs(scratch, exist_ok=True)
    return build, mb, scratch, kind, rounds


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main():
    build, mb, scratch, kind, rounds = parse_args(sys.argv[1:])
    have_dcpp = os.path.exists(os.path.join(build, "bench", "dcpp_s3_bench"))
    dcpp_shapes = ((1, 1), (1, 4), (4, 1), (4, 2)) if have_dcpp else ()
    # Alternating rounds, each case on a fresh server; every figure is the median of its rounds.
    torch_runs = {t: [] for t in (1, 4)}
    dcpp_runs = {rt: [] for rt in dcpp_shapes}
    bound_runs = {n: [] for n in (1, 4)}
    for _ in range(rounds):
        for t in torch_runs:
            torch_runs[t].append(torch_case(mb, t, kind, scratch))
        for ranks, threads in dcpp_runs:
            dcpp_runs[(ranks, threads)].append(dcpp_case(build, mb, ranks, threads, kind, scratch))
    for n in bound_runs:  # the server alone: one round is enough for a bound
        bound_runs[n].append(server_bound(mb, n, kind, scratch))

    def rate(runs, what):
        return gbs(runs[0]["bytes"], median([r[what] for r in runs]))

    rows = []
    torch_best = {"save": 0.0, "load": 0.0}
    for threads, runs in torch_runs.items():
        figs = {"save_GBps": rate(runs, "save_s"), "load_GBps": rate(runs, "load_s"),
                "MiB": runs[0]["bytes"] >> 20, "rounds": len(runs)}
        torch_best["save"] = max(torch_best["save"], figs["save_GBps"])
        torch_best["load"] = max(torch_best["load"], figs["load_GBps"])
        rows.append({"case": f"s3/{kind}/pytorch_fsspec/threads={threads}", "figures": figs,
                     "target": "reference (PyTorch 2.13 FsspecWriter/FsspecReader, s3fs)",
                     "pass": True})
    if not have_dcpp:
        rows.append({"case": f"s3/{kind}/dcpp", "figures": {},
                     "target": f"not measured: {build}/bench/dcpp_s3_bench is missing (configure "
                               "the build with -DDCPP_BUILD_BENCHMARKS=ON)",
                     "pass": False})
    for (ranks, threads), runs in dcpp_runs.items():
        figs = {"save_GBps": rate(runs, "save_s"), "load_GBps": rate(runs, "load_s"),
                "MiB": runs[0]["bytes"] >> 20, "rounds": len(runs)}
        faults = sum(1 for f in SERVER_FAULTS if (f["ranks"], f["threads"]) == (ranks, threads))
        if faults:
            figs["reruns_after_server_errors"] = faults
        rows.append({"case": f"s3/{kind}/dcpp/ranks={ranks}/threads={threads}", "figures": figs,
                     "target": f">= best PyTorch fsspec of this run (save {torch_best['save']}, "
                               f"load {torch_best['load']} GB/s)",
                     "pass": figs["save_GBps"] >= torch_best["save"] and
                             figs["load_GBps"] >= torch_best["load"]})
        rows.append({"case": f"s3/{kind}/dcpp_store_raw/objects={ranks * threads}",
                     "figures": {"put_GBps": rate(runs, "raw_put_s"),
                                 "get_GBps": rate(runs, "raw_get_s")},
                     "target": "the S3 store alone, same bytes as parallel whole objects",
                     "pass": True})
    for streams, runs in bound_runs.items():
        rows.append({"case": f"s3/{kind}/server_bound/streams={streams}",
                     "figures": {"put_GBps": rate(runs, "put_s"), "get_GBps": rate(runs, "get_s")},
                     "target": f"{kind}'s own rate with a plain HTTP client (the bound)",
                     "pass": True})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
