"""Checks deploy/: run by deploy/check.sh, which installs the tools and passes their paths.

1. The Dockerfile: hadolint; then, parsed with dockerfile-parse, what the manifests and CI rely
   on (two stages, the builder's Rust is CI's, the release build command is the one .ci/run
   runs, distroless runtime, numeric non-root USER, FICUS_CONFIG, ENTRYPOINT, no HEALTHCHECK),
   and its build context (the tracked files minus .dockerignore) passes `cargo fetch --locked`,
   which reads the whole manifest (every declared target must be there) and the lock file.
2. Every kustomization under deploy/kubernetes rendered by a real kustomize (`kubectl
   kustomize`); every rendered built-in resource validated against the Kubernetes OpenAPI
   schemas, strictly (unknown fields are errors), for the oldest and newest version the variant
   supports; the PodMonitor (a CRD, absent from those schemas) validated against the Prometheus
   Operator's own models, unknown fields included. A negative control proves the strict
   validation bites: the native-sidecar base must fail against 1.27.
3. Cross-checks between the pod, the ficus config in the ConfigMap and the image: ports,
   probes, Service target, scrape port, config mount without subPath, outbox on a volume larger
   than outbox.max_bytes, security context, resources, the grace period covering the shutdown
   budget, the NetworkPolicy, and the StatefulSet's pod template equal to the Deployment's.

Exits non-zero with every failure listed.
"""

import argparse
import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUSTOMIZE_ROOT = os.path.join(ROOT, "deploy", "kubernetes")
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
CI_RUN = os.path.join(ROOT, ".ci", "run")

# Kubernetes versions each variant is validated against: the first that has what it uses, and
# the newest the bundled schemas know. Native sidecars are on by default from 1.29.
NATIVE_VERSIONS = ["1.29.0", "1.37.0"]
CLASSIC_VERSIONS = ["1.25.0", "1.37.0"]
# What the example assumes the monolith needs to drain after its SIGTERM (its own setting):
# part of the grace-period budget of deploy/README.md.
MONOLITH_DRAIN_SECONDS = 20
MARGIN_SECONDS = 10
NONROOT_UID = 65532

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def rel(path):
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------------------------
# units


def seconds(text):
    """A ficus duration (`20s`, `500ms`, `1m`, `1h 30m`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)", str(text))
    if not parts or re.sub(r"[\d.\s]|ms|min|s|m|h", "", str(text)):
        raise ValueError(f"not a duration: {text!r}")
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def size_bytes(text):
    """A ficus size (`1GiB`, `512MiB`) or a Kubernetes quantity (`2Gi`, `500M`) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?", str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, unit = float(m.group(1)), m.group(2) or ""
    powers = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return number * powers[unit]


# ---------------------------------------------------------------------------------------------
# 1. Dockerfile


def ci_release_build_command():
    with open(CI_RUN) as f:
        lines = [l.strip() for l in f if l.strip().startswith("cargo build --release")]
    if len(lines) != 1:
        fail(rel(CI_RUN), f"expected one `cargo build --release ...` line, found {len(lines)}")
        return None
    return lines[0]


def check_dockerfile(hadolint):
    where = rel(DOCKERFILE)
    out = subprocess.run([hadolint, "--failure-threshold", "style", DOCKERFILE],
                         capture_output=True, text=True)
    if out.returncode != 0:
        fail(where, "hadolint:\n" + out.stdout + out.stderr)

    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=DOCKERFILE)
    instructions = parser.structure
    stages = [i for i in instructions if i["instruction"] == "FROM"]
    if len(stages) != 2:
        fail(where, f"expected a builder and a runtime stage, found {len(stages)} FROM")
        return None
    builder_from = stages[0]["value"].split()
    m = re.fullmatch(r"rust:(\d+\.\d+)(?:\.\d+)?-bookworm", builder_from[0])
    if not m or builder_from[1:] != ["AS", "builder"] and builder_from[1:] != ["as", "builder"]:
        fail(where, f"builder stage should be `rust:X.Y-bookworm AS builder`, found {stages[0]['value']}")
    else:
        rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout
        ci = re.match(r"rustc (\d+\.\d+)", rustc)
        if not ci or ci.group(1) != m.group(1):
            fail(where, f"builder uses Rust {m.group(1)}, CI uses {rustc.strip()}: "
                        "make the FROM line name CI's version")
    if stages[1]["value"] != "gcr.io/distroless/cc-debian12:nonroot":
        fail(where, f"runtime stage should be gcr.io/distroless/cc-debian12:nonroot, found {stages[1]['value']}")

    builder_end = stages[1]["startline"]
    runs = [i for i in instructions if i["instruction"] == "RUN" and i["startline"] < builder_end]
    ci_cmd = ci_release_build_command()
    cargo = []
    for run in runs:
        # the command after the BuildKit flags, each `&&` part on its own
        body = re.sub(r"--mount=\S+\s*", "", run["value"])
        cargo += [p.strip() for p in body.split("&&") if p.strip().startswith("cargo ")]
    if len(cargo) != 1:
        fail(where, f"expected one cargo command in the builder, found {cargo}")
    elif ci_cmd is not None and cargo[0] != ci_cmd:
        fail(where, f"the builder runs `{cargo[0]}`, .ci/run runs `{ci_cmd}`: make them the same")

    runtime = [i for i in instructions if i["startline"] > builder_end]
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    if not users or not re.fullmatch(rf"{NONROOT_UID}(:{NONROOT_UID})?", users[-1]):
        fail(where, f"the runtime stage should end with a numeric USER {NONROOT_UID}, found {users}")
    entry = [i["value"] for i in runtime if i["instruction"] == "ENTRYPOINT"]
    if entry != ['["ficus", "run"]']:
        fail(where, f'ENTRYPOINT should be ["ficus", "run"], found {entry}')
    if any(i["instruction"] == "HEALTHCHECK" for i in instructions):
        fail(where, "no HEALTHCHECK: Kubernetes probes /healthz and /readyz")
    if any(i["instruction"] == "CMD" for i in runtime):
        fail(where, "no CMD: the pod's args would replace it silently")
    env = parser.envs
    if env.get("FICUS_CONFIG") != "/etc/ficus/ficus.yaml":
        fail(where, f"FICUS_CONFIG should be /etc/ficus/ficus.yaml, found {env.get('FICUS_CONFIG')}")
    copies = " ".join(i["value"] for i in runtime if i["instruction"] == "COPY")
    if "/usr/local/bin/ficus" not in copies:
        fail(where, "the runtime stage should put the binary at /usr/local/bin/ficus (on PATH)")
    check_build_context()
    uid = users[-1].split(":")[0] if users else ""
    return {"user": int(uid) if uid.isdigit() else None, "config": env.get("FICUS_CONFIG")}


def dockerignore_patterns():
    path = os.path.join(ROOT, ".dockerignore")
    if not os.path.exists(path):
        fail(".dockerignore", "missing (the build context would send target/)")
        return []
    with open(path) as f:
        pats = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    if any(p.startswith("!") for p in pats):
        fail(".dockerignore", "exceptions (!) are not understood by this check")
    if "target/" not in pats and "target" not in pats and "/target" not in pats:
        fail(".dockerignore", "must exclude target/")
    return [p.strip("/") for p in pats]


def ignored(path, patterns):
    """Docker's .dockerignore matching for the pattern forms used here (names, dir/, **/glob)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        if pat.startswith("**/"):
            tail = pat[3:]
            if any(fnmatch.fnmatch("/".join(parts[i:]), tail) for i in range(len(parts))):
                return True
        elif any(fnmatch.fnmatch(p, pat) for p in prefixes):
            return True
    return False


def check_build_context():
    """The files `COPY . .` sends on a clean clone, and `cargo fetch --locked` on them."""
    patterns = dockerignore_patterns()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    files = [f for f in files if f and os.path.exists(os.path.join(ROOT, f))]
    kept = [f for f in files if not ignored(f, patterns)]
    if not any(f == "Cargo.lock" for f in kept):
        fail(".dockerignore", "Cargo.lock must be in the build context (--locked)")
    with tempfile.TemporaryDirectory() as ctx:
        for f in kept:
            dst = os.path.join(ctx, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), dst)
        out = subprocess.run(["cargo", "fetch", "--locked", "--quiet"], cwd=ctx,
                             capture_output=True, text=True)
        if out.returncode != 0:
            fail("deploy/Dockerfile build context", "`cargo fetch --locked` on the tracked files "
                 "minus .dockerignore failed:\n" + out.stderr)


# ---------------------------------------------------------------------------------------------
# 2. Render and validate


def kustomizations():
    found = []
    for dirpath, _, names in os.walk(KUSTOMIZE_ROOT):
        if "kustomization.yaml" in names:
            found.append(dirpath)
    return sorted(found)


def render(kubectl, directory, out_dir):
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if out.returncode != 0:
        fail(rel(directory), "kustomize failed:\n" + out.stderr)
        return []
    name = rel(directory).replace("deploy/kubernetes/", "").replace("/", "-")
    with open(os.path.join(out_dir, name + ".yaml"), "w") as f:
        f.write(out.stdout)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def builtin(doc):
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    return group in ("", "apps", "batch", "networking.k8s.io", "policy", "autoscaling",
                     "rbac.authorization.k8s.io")


def is_native(docs):
    return any(c.get("restartPolicy") == "Always"
               for w in workloads(docs) for c in w["spec"]["template"]["spec"].get("initContainers", []))


def validate_schemas(where, docs, versions):
    import kubernetes_validate

    for doc in docs:
        name = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
        if not builtin(doc):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                fail(name, f"Kubernetes {version} schema: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(name, f"no Kubernetes {version} schema for {doc['apiVersion']} {doc['kind']}")


def validate_crds(where, docs):
    known = {("monitoring.coreos.com/v1", "PodMonitor")}
    for doc in docs:
        if builtin(doc):
            continue
        name = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) not in known:
            fail(name, "a custom resource this check has no schema for")
            continue
        from cloudcoil.models.prometheus_operator.v1 import PodMonitor
        import pydantic

        try:
            model = PodMonitor.model_validate(doc)
        except pydantic.ValidationError as e:
            fail(name, f"Prometheus Operator v0.80 PodMonitor schema: {e}")
            continue
        # The models ignore unknown fields: what they dropped is what the CRD does not know.
        again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        for path in unknown_fields(doc, again):
            fail(name, f"{path}: not a field of PodMonitor (Prometheus Operator v0.80)")


def unknown_fields(given, kept, path=""):
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        for k, v in given.items():
            p = f"{path}.{k}" if path else k
            if k not in kept:
                yield p
            else:
                yield from unknown_fields(v, kept[k], p)
    elif isinstance(given, list):
        kept = kept if isinstance(kept, list) else []
        for i, v in enumerate(given):
            yield from unknown_fields(v, kept[i] if i < len(kept) else None, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------
# 3. Cross-checks


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def ficus_container(pod):
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        if c["name"] == "ficus":
            return c
    return None


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def prestop_seconds(container):
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0].endswith("sleep"):
        return float(cmd[1])
    return None


def cross_check(where, docs, image):
    for w in workloads(docs):
        name = f"{where}: {w['kind']}/{w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        ficus = ficus_container(pod)
        if ficus is None:
            fail(name, "no container named ficus")
            continue
        native = ficus in pod.get("initContainers", [])
        if native and ficus.get("restartPolicy") != "Always":
            fail(name, "ficus as an init container needs restartPolicy: Always (native sidecar)")
        if native and pod["initContainers"][0] is not ficus:
            fail(name, "ficus should be the first init container (it starts before the rest)")

        # the config: a ConfigMap volume mounted as a directory, FICUS_CONFIG inside it
        env = {e["name"]: e.get("value") for e in ficus.get("env", [])}
        config_path = env.get("FICUS_CONFIG", image and image["config"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"]: c for c in w["spec"].get("volumeClaimTemplates", [])}
        mounts = ficus.get("volumeMounts", [])
        config_mount = next((m for m in mounts if config_path and
                             config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        config = None
        if config_mount is None:
            fail(name, f"FICUS_CONFIG {config_path} is on no volume mount of ficus")
        else:
            if "subPath" in config_mount or "subPathExpr" in config_mount:
                fail(name, "the config mount uses subPath: ConfigMap updates would never arrive")
            vol = volumes.get(config_mount["name"], {})
            cm_name = vol.get("configMap", {}).get("name")
            key = config_path[len(config_mount["mountPath"].rstrip("/")) + 1:]
            cms = find(docs, "ConfigMap", cm_name)
            if not cms:
                fail(name, f"the config volume names ConfigMap {cm_name}, which the render lacks "
                           "(a generated name with a hash suffix?)")
            elif key not in cms[0].get("data", {}):
                fail(name, f"ConfigMap {cm_name} has no key {key}")
            else:
                config = yaml.safe_load(cms[0]["data"][key])
        if config is None:
            continue

        listen = port_of(config["listen"]["address"])
        admin = port_of(config["admin"]["address"])
        if not str(config["listen"]["address"]).startswith("0.0.0.0:"):
            fail(name, "listen.address should be 0.0.0.0:PORT: the Service reaches the pod IP")
        ports = {p["containerPort"]: p for p in ficus.get("ports", [])}
        for port, what in ((listen, "listen"), (admin, "admin")):
            if port not in ports:
                fail(name, f"ficus does not declare its {what} port {port}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("startupProbe", None)):
            p = ficus.get(probe)
            if p is None:
                if probe != "startupProbe":
                    fail(name, f"ficus has no {probe}")
                continue
            get = p.get("httpGet", {})
            port = get.get("port")
            port = next((n for n, d in ports.items() if d.get("name") == port), port)
            if port != admin or (path and get.get("path") != path):
                fail(name, f"{probe} should be GET {path or '/healthz or /readyz'} on the admin "
                           f"port {admin}, found {get}")
        if native and "startupProbe" not in ficus:
            fail(name, "a native sidecar without a startupProbe lets the monolith start before ficus listens")

        # the monolith: reached over loopback, on a port that is not ficus's
        upstream = config["upstreams"][config.get("default_upstream") or next(iter(config["upstreams"]))]
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", str(upstream["url"]))
        if not m:
            fail(name, f"the default upstream should be the monolith on loopback, found {upstream['url']}")
            monolith_port = None
        else:
            monolith_port = int(m.group(1))
            others = [c for c in pod.get("containers", []) if c is not ficus]
            if not any(p["containerPort"] == monolith_port for c in others for p in c.get("ports", [])):
                fail(name, f"no other container declares the upstream's port {monolith_port}")

        # the Service targets ficus, not the monolith
        for svc in find(docs, "Service"):
            if svc["spec"].get("clusterIP") == "None":
                continue
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                target = next((n for n, d in ports.items() if d.get("name") == target), target)
                if target != listen:
                    fail(f"{where}: Service/{svc['metadata']['name']}",
                         f"port {sp['port']} targets {target}, not ficus's listen port {listen}")

        # scraping: annotations and PodMonitor on the admin port
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(admin) \
                or ann.get("prometheus.io/path") != "/metrics":
            fail(name, f"prometheus.io annotations should scrape :{admin}/metrics, found {ann}")
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        for pm in find(docs, "PodMonitor"):
            sel = pm["spec"]["selector"].get("matchLabels", {})
            if any(labels.get(k) != v for k, v in sel.items()):
                fail(f"{where}: PodMonitor/{pm['metadata']['name']}", f"selector {sel} misses the pods {labels}")
            for ep in pm["spec"]["podMetricsEndpoints"]:
                named = next((n for n, d in ports.items() if d.get("name") == ep.get("port")), None)
                if named != admin or ep.get("path", "/metrics") != "/metrics":
                    fail(f"{where}: PodMonitor/{pm['metadata']['name']}",
                         f"endpoint {ep} is not ficus's admin port {admin} /metrics")

        # the outbox: on a volume, larger than outbox.max_bytes
        outbox = config.get("outbox", {})
        outbox_dir = outbox.get("dir", "/var/lib/ficus/outbox")
        max_bytes = size_bytes(outbox.get("max_bytes", "1GiB"))
        mount = next((mt for mt in mounts if outbox_dir.rstrip("/").startswith(mt["mountPath"].rstrip("/") + "/")
                      or outbox_dir.rstrip("/") == mt["mountPath"].rstrip("/")), None)
        if mount is None:
            fail(name, f"outbox.dir {outbox_dir} is on no volume: the read-only root would refuse it")
        elif mount.get("readOnly"):
            fail(name, f"the outbox volume {mount['name']} is mounted read-only")
        else:
            if mount["name"] in volumes and "emptyDir" in volumes[mount["name"]]:
                limit = volumes[mount["name"]]["emptyDir"].get("sizeLimit")
                if limit is None:
                    fail(name, "the outbox emptyDir has no sizeLimit")
                elif size_bytes(limit) <= max_bytes:
                    fail(name, f"emptyDir sizeLimit {limit} is not above outbox.max_bytes "
                               f"{outbox.get('max_bytes')}: the pod would be evicted before ficus refuses")
            elif mount["name"] in claims:
                storage = claims[mount["name"]]["spec"]["resources"]["requests"]["storage"]
                if size_bytes(storage) <= max_bytes:
                    fail(name, f"the outbox claim ({storage}) is not above outbox.max_bytes")
            else:
                fail(name, f"the outbox volume {mount['name']} is neither an emptyDir nor a claim template")

        # security
        sc = ficus.get("securityContext", {})
        psc = pod.get("securityContext", {})
        want = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
        for k, v in want.items():
            if sc.get(k) != v:
                fail(name, f"ficus securityContext.{k} should be {v}")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            fail(name, "ficus should drop ALL capabilities")
        if sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            fail(name, "seccompProfile should be RuntimeDefault")
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if image and uid not in (None, image["user"]):
            fail(name, f"runAsUser {uid} differs from the image's USER {image['user']}")
        if psc.get("fsGroup") != NONROOT_UID and sc.get("runAsGroup") != psc.get("fsGroup"):
            fail(name, f"fsGroup should be {NONROOT_UID}: the outbox volume must be writable by ficus")
        if "command" in ficus or "args" in ficus:
            fail(name, "ficus sets command/args: the image's ENTRYPOINT is `ficus run`")
        res = ficus.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    fail(name, f"ficus resources.{kind}.{r} is not set")

        # shutdown budget
        shutdown = config.get("shutdown", {})
        drain = seconds(shutdown.get("drain_timeout", "30s"))
        delivery = seconds(shutdown.get("delivery_timeout", "5s"))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        others = [c for c in pod.get("containers", []) if c is not ficus]
        pre = [prestop_seconds(c) for c in others]
        own = prestop_seconds(ficus)
        if None in pre or own is None:
            fail(name, "a preStop hook this check cannot time (use sleep)")
            continue
        if native:
            # the monolith stops first (preStop, drain), then ficus (drain, delivery)
            budget = max(pre, default=0) + MONOLITH_DRAIN_SECONDS + own + drain + delivery + MARGIN_SECONDS
        else:
            # all at once, each after its own preStop
            budget = max(pre + [own]) + max(MONOLITH_DRAIN_SECONDS, drain) + delivery + MARGIN_SECONDS
            if own == 0:
                fail(name, "ficus as a regular container needs a preStop sleep: it gets SIGTERM "
                           "with the monolith and would refuse connections still being routed to it")
        if grace < budget:
            fail(name, f"terminationGracePeriodSeconds {grace} < {budget:g} s needed "
                       f"(preStop, monolith drain {MONOLITH_DRAIN_SECONDS}, drain_timeout {drain:g}, "
                       f"delivery_timeout {delivery:g}, margin {MARGIN_SECONDS})")

        # NetworkPolicy: the proxy port open, the admin port only from somewhere, the monolith closed
        for np in find(docs, "NetworkPolicy"):
            npn = f"{where}: NetworkPolicy/{np['metadata']['name']}"
            sel = np["spec"]["podSelector"].get("matchLabels", {})
            if any(labels.get(k) != v for k, v in sel.items()):
                fail(npn, f"podSelector {sel} misses the pods")
            rules = np["spec"].get("ingress", [])
            opened = {}
            for r in rules:
                for p in r.get("ports", []):
                    opened.setdefault(p["port"], []).append(bool(r.get("from")))
            if listen not in opened:
                fail(npn, f"does not admit the proxy port {listen}")
            if admin not in opened or not all(opened[admin]):
                fail(npn, f"the admin port {admin} must be admitted only from named peers")
            if monolith_port in opened:
                fail(npn, f"admits the monolith's port {monolith_port}: clients could bypass ficus")
            if any(not r.get("ports") for r in rules):
                fail(npn, "a rule without ports admits every port, the monolith's included")


def compare_statefulset(rendered):
    """overlays/statefulset's pod template must be the base Deployment's, volumes aside."""
    base = rendered.get("base")
    sts_docs = rendered.get("overlays-statefulset")
    if base is None or sts_docs is None:
        return
    deps = find(base, "Deployment")
    stss = find(sts_docs, "StatefulSet")
    if len(deps) != 1 or len(stss) != 1 or find(sts_docs, "Deployment"):
        fail("overlays/statefulset", "expected the base's one Deployment replaced by one StatefulSet")
        return
    a = copy.deepcopy(deps[0]["spec"]["template"])
    b = copy.deepcopy(stss[0]["spec"]["template"])
    claims = {c["metadata"]["name"] for c in stss[0]["spec"].get("volumeClaimTemplates", [])}
    a["spec"]["volumes"] = [v for v in a["spec"].get("volumes", []) if v["name"] not in claims]
    if a != b:
        fail("overlays/statefulset/statefulset.yaml",
             "its pod template differs from base/deployment.yaml's (other than the claimed volumes): "
             "make the same change in both")
    if deps[0]["spec"]["selector"] != stss[0]["spec"]["selector"]:
        fail("overlays/statefulset/statefulset.yaml", "selector differs from the Deployment's")


def negative_control(docs):
    """Strict validation must reject the native sidecar on 1.27, which has no restartPolicy
    on containers: otherwise the schema validation above proves nothing."""
    import kubernetes_validate

    for w in workloads(docs):
        try:
            kubernetes_validate.validate(w, "1.27.0", strict=True)
        except kubernetes_validate.ValidationError:
            return
    fail("check.py", "negative control: the native-sidecar base validated against Kubernetes "
                     "1.27, which does not know it; the schema validation is not effective")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--hadolint", required=True)
    ap.add_argument("--out", required=True, help="directory for the rendered manifests")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    image = check_dockerfile(args.hadolint)
    rendered = {}
    for directory in kustomizations():
        docs = render(args.kubectl, directory, args.out)
        if not docs:
            continue
        where = rel(directory)
        rendered[where.replace("deploy/kubernetes/", "").replace("/", "-")] = docs
        native = is_native(docs)
        versions = NATIVE_VERSIONS if native else CLASSIC_VERSIONS
        validate_schemas(where, docs, versions)
        validate_crds(where, docs)
        cross_check(where, docs, image)
        kinds = ", ".join(sorted(f"{d['kind']}" for d in docs))
        print(f"  {where}: {len(docs)} resources ({kinds}); "
              f"{'native sidecar' if native else 'classic sidecar'}, "
              f"schemas {' and '.join(versions)}")
    for want in ("base", "overlays-example", "overlays-classic-sidecar", "overlays-statefulset"):
        if want not in rendered:
            fail("deploy/kubernetes", f"{want.replace('-', '/', 1)} did not render")
    compare_statefulset(rendered)
    if "base" in rendered:
        negative_control(rendered["base"])

    if failures:
        print(f"deploy/check: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
