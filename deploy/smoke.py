"""The pod's runtime contract, without a container engine: deploy/check.sh runs this as root in
a private mount and network namespace (`unshare --mount --net`) with the release binary, the
one deploy/Dockerfile builds.

Inside, it lays out what the kubelet gives the ficus container of the rendered base Deployment:
the root filesystem read-only (readOnlyRootFilesystem), only /var/lib writable (a tmpfs standing
for the `outbox` volume, group-owned like fsGroup does), the ConfigMap's ficus.yaml in the
kubelet's layout (`ficus.yaml -> ..data/ficus.yaml`, `..data -> ..TIMESTAMP`), the container's
env, uid/gid 65532 with no capabilities and no_new_privs, the image's `ficus run`; a stand-in
monolith on 127.0.0.1:8080 and no route to the NATS server (the broker is down). Then:
/healthz and /readyz answer 200 on the admin port, `POST /orders` through the proxy port is
answered 201 with its event emitted and pending for the sink, SIGTERM ends ficus with exit 0
within drain_timeout + delivery_timeout, the event waits in the outbox on the volume
(`ficus outbox status`), and ficus logged no write refused by the read-only root.
"""

import argparse
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import yaml

UID = 65532


def die(message, log=""):
    print(f"deploy/smoke: {message}", file=sys.stderr)
    if log:
        print("---- ficus's log ----\n" + log, file=sys.stderr)
    sys.exit(1)


def http_call(method, url, body=None, headers=None, timeout=5):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Monolith(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        Monolith.seen.append(("POST", self.path))
        body = json.dumps({"id": "o-1", "total": 19.8, "currency": "EUR"}).encode()
        self.send_response(201 if self.path == "/orders" else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(text))
    if not m:
        die(f"cannot read the duration {text!r}")
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--rendered", required=True, help="the rendered base (target/deploy-check/base.yaml)")
    ap.add_argument("--work", required=True, help="an empty directory, removed by the caller")
    args = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    ficus = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "ficus")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    config_text = configmap["data"]["ficus.yaml"]
    config = yaml.safe_load(config_text)
    admin = int(config["admin"]["address"].rsplit(":", 1)[1])
    listen = int(config["listen"]["address"].rsplit(":", 1)[1])
    outbox_dir = config["outbox"]["dir"]
    if not outbox_dir.startswith("/var/lib/"):
        die(f"this smoke test puts the outbox volume at /var/lib; the config says {outbox_dir}")
    budget = seconds(config["shutdown"]["drain_timeout"]) + seconds(config["shutdown"]["delivery_timeout"])

    # Before the root turns read-only: the binary and the ConfigMap volume, readable by 65532.
    work = args.work
    os.chmod(work, 0o755)
    shutil.copy(args.binary, os.path.join(work, "ficus"))
    os.chmod(os.path.join(work, "ficus"), 0o755)
    volume = os.path.join(work, "etc-ficus")
    stamp = "..2025_01_01_00_00_00.000000001"
    os.makedirs(os.path.join(volume, stamp), mode=0o755)
    with open(os.path.join(volume, stamp, "ficus.yaml"), "w") as f:
        f.write(config_text)
    os.symlink(stamp, os.path.join(volume, "..data"))
    os.symlink("..data/ficus.yaml", os.path.join(volume, "ficus.yaml"))
    os.chmod(volume, 0o755)

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "outbox", "/var/lib"], check=True)
    state = os.path.dirname(outbox_dir.rstrip("/"))
    os.makedirs(state, exist_ok=True)
    os.chown(state, 0, UID)
    os.chmod(state, 0o2775)
    subprocess.run(["mount", "-o", "remount,bind,ro", "/"], check=True)
    try:
        open(os.path.join(work, "probe"), "w")
        die("the root filesystem is still writable")
    except OSError:
        pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Monolith)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    env = {"PATH": f"{work}:/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent"}
    for e in ficus.get("env", []):
        env[e["name"]] = e["value"]
    mount = next(m for m in ficus["volumeMounts"] if env["FICUS_CONFIG"].startswith(m["mountPath"] + "/"))
    env["FICUS_CONFIG"] = volume + env["FICUS_CONFIG"][len(mount["mountPath"]):]
    drop = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all"]
    log_path = "/var/lib/smoke-ficus.log"  # on the tmpfs: the root is read-only now
    log = open(log_path, "w+")
    proc = subprocess.Popen(drop + ["ficus", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)

    def logged():
        log.flush()
        with open(log_path) as f:
            return f.read()

    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                die(f"ficus exited with {proc.returncode} before it was ready", logged())
            try:
                if http_call("GET", f"http://127.0.0.1:{admin}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                die("/readyz did not answer 200 within 15 s", logged())
            time.sleep(0.1)
        if http_call("GET", f"http://127.0.0.1:{admin}/healthz")[0] != 200:
            die("/healthz is not 200", logged())

        status, _ = http_call("POST", f"http://127.0.0.1:{listen}/orders", b'{"customer_id":"c-1"}',
                              {"content-type": "application/json"})
        if status != 201 or ("POST", "/orders") not in Monolith.seen:
            die(f"POST /orders through ficus: {status}, monolith saw {Monolith.seen}", logged())

        def metric(name, labels):
            text = http_call("GET", f"http://127.0.0.1:{admin}/metrics")[1]
            for line in text.splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
            return None

        if metric("ficus_events_emitted_total", {"rule": "order-created"}) != 1:
            die("the order's event was not emitted", logged())
        sink = next(iter(config["sinks"]))
        deadline = time.monotonic() + 5
        while metric("ficus_outbox_pending_events", {"sink": sink}) != 1:
            if time.monotonic() > deadline:
                die(f"the event is not pending for sink {sink} (the broker is unreachable)", logged())
            time.sleep(0.1)

        started = time.monotonic()
        proc.terminate()
        try:
            rc = proc.wait(timeout=budget + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            die(f"ficus did not exit within drain + delivery + 10 s ({budget + 10:g} s) of SIGTERM", logged())
        took = time.monotonic() - started
        if rc != 0:
            die(f"ficus exited {rc} on SIGTERM", logged())

        status = subprocess.run(drop + ["ficus", "outbox", "status"], env=env, capture_output=True, text=True)
        rows = [l.split() for l in status.stdout.splitlines()]
        pending = [r[2] for r in rows if len(r) >= 5 and r[0] == sink]
        if status.returncode != 0 or pending != ["1"]:
            die(f"`ficus outbox status` after the stop:\n{status.stdout}{status.stderr}", logged())
        text = logged()
        if re.search(r"read-only file system|os error 30", text, re.IGNORECASE):
            die("ficus tried to write outside its volume", text)
        print(f"  smoke: read-only root, uid {UID}, no capabilities: ready, 201 with its event, "
              f"SIGTERM -> exit 0 in {took:.1f} s (budget {budget:g} s), 1 event kept on the volume")
    finally:
        if proc.poll() is None:
            proc.kill()
        server.shutdown()


if __name__ == "__main__":
    main()
