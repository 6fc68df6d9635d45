#!/usr/bin/env python3
"""A loopback HTTP proxy in front of an S3 server that injects faults, for dcpp's S3 tests.

Requests are forwarded unchanged (the Host header included, so signatures stay valid) unless a
rule fires:
  --fail-status CODE --fail-method M --fail-substring S --fail-first K --fail-every N
      matching requests (method M, path+query containing S) get CODE with an S3 XML error body:
      the first K of them (K=-1: all), or every Nth of them.
  --fail-once-every N (with --fail-status)
      a matching request whose (method, path, Range) hashes to 0 mod N fails the first time it is
      seen and passes when retried: faults that retries always overcome, whatever the
      interleaving of concurrent requests.
  --hang-once-substring S
      the first request whose path+query contains S gets no answer at all (the proxy holds the
      connection open and silent): a stalled server, which the client must time out and retry.
  --die-after-upload-bytes B
      once more than B request-body bytes have been received in total, the proxy SIGKILLs itself
      in the middle of that request: a server that dies mid-save.
  --verify-sigv4 KEY:SECRET
      every request must carry an AWS SigV4 signature of KEY:SECRET that botocore (AWS's own
      Python implementation) recomputes identically; otherwise 403 SignatureDoesNotMatch. moto
      does not check signatures, so this is what holds the client's signing to the standard.
The proxy binds port 0 on 127.0.0.1 and writes its port to --port-file when ready.
"""
import argparse
import http.client
import os
import re
import signal
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
       "upgrade"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--fail-status", type=int, default=0)
    ap.add_argument("--fail-method", default="")
    ap.add_argument("--fail-substring", default="")
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--fail-once-every", type=int, default=0)
    ap.add_argument("--die-after-upload-bytes", type=int, default=-1)
    ap.add_argument("--verify-sigv4", default="")
    ap.add_argument("--hang-once-substring", default="")
    args = ap.parse_args()

    def signature_problem(handler, body):
        """None if the request's SigV4 signature is what botocore computes, else why not."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        key, secret = args.verify_sigv4.split(":", 1)
        m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, ?"
                         r"SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})",
                         handler.headers.get("Authorization", ""))
        if not m:
            return "no SigV4 Authorization header"
        cred_key, _, region, signed, signature = m.groups()
        if cred_key != key:
            return "unknown access key " + cred_key
        names = signed.split(";")
        for required in ("host", "x-amz-date", "x-amz-content-sha256"):
            if required not in names:
                return "header " + required + " is not signed"
        if handler.headers.get("x-amz-security-token") and "x-amz-security-token" not in names:
            return "the session token is not signed"
        headers = {n: handler.headers.get(n, "") for n in names}
        req = AWSRequest(method=handler.command, url="http://" + handler.headers["Host"] +
                         handler.path, headers=headers, data=body)
        req.context["timestamp"] = handler.headers["x-amz-date"]
        auth = S3SigV4Auth(Credentials(key, secret), "s3", region)
        canonical = auth.canonical_request(req)
        want = auth.signature(auth.string_to_sign(req, canonical), req)
        if want != signature:
            return (f"signature differs; request headers: {dict(handler.headers)}; "
                    f"botocore's signature {want} of the canonical request:\n{canonical}")
        return None

    lock = threading.Lock()
    state = {"matched": 0, "failed": 0, "upload_bytes": 0}
    seen = set()
    hung = []

    def should_fail(method, path, range_header):
        if not args.fail_status:
            return False
        if args.fail_method and method != args.fail_method:
            return False
        if args.fail_substring and args.fail_substring not in path:
            return False
        if args.fail_once_every > 0:
            sig = f"{method} {path} {range_header}"
            if zlib.crc32(sig.encode()) % args.fail_once_every != 0:
                return False
            with lock:
                if sig in seen:
                    return False
                seen.add(sig)
                return True
        with lock:
            state["matched"] += 1
            n = state["matched"]
            if args.fail_first < 0 or n <= args.fail_first:
                return True
            return args.fail_every > 0 and n % args.fail_every == 0

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def _read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            chunks = []
            while n > 0:
                piece = self.rfile.read(min(n, 1 << 20))
                if not piece:
                    break
                n -= len(piece)
                chunks.append(piece)
                if args.die_after_upload_bytes >= 0:
                    with lock:
                        state["upload_bytes"] += len(piece)
                        if state["upload_bytes"] > args.die_after_upload_bytes:
                            sys.stderr.write("s3_fault_proxy: dying mid-request\n")
                            sys.stderr.flush()
                            os.kill(os.getpid(), signal.SIGKILL)
            return b"".join(chunks)

        def _error(self, code, err, message):
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{err}</Code>'
                       f"<Message>{message}</Message></Error>").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length",
                             str(len(payload) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _handle(self):
            body = self._read_body()
            problem = signature_problem(self, body) if args.verify_sigv4 else None
            if problem:
                sys.stderr.write(f"s3_fault_proxy: {self.command} {self.path}: {problem}\n")
                sys.stderr.flush()
                self._error(403, "SignatureDoesNotMatch", problem.split("\n")[0])
                return
            if args.hang_once_substring and args.hang_once_substring in self.path:
                with lock:
                    first = not hung
                    hung.append(self.path)
                if first:
                    sys.stderr.write(f"s3_fault_proxy: holding {self.command} {self.path}\n")
                    sys.stderr.flush()
                    time.sleep(3600)  # never answer; the process is killed after the test
                    return
            if should_fail(self.command, self.path, self.headers.get("Range", "")):
                code = args.fail_status
                err = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError",
                       503: "SlowDown"}.get(code, "InjectedFault")
                self._error(code, err, "injected by s3_fault_proxy")
                return
            conn = http.client.HTTPConnection("127.0.0.1", args.upstream_port, timeout=120)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() in HOP or k.lower() == "content-length":
                    continue
                conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in HOP or k.lower() == "content-length":
                    continue
                self.send_header(k, v)
            length = resp.getheader("Content-Length")
            if self.command == "HEAD" and length is not None:
                self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
