"""A real kube-apiserver with etcd for tests and dev, built from Go modules and cached outside the repo.

Neither ``k8s.io/kubernetes`` nor ``go.etcd.io/etcd/server/v3`` can be ``go install``ed: their
go.mod files replace sibling modules (the Kubernetes staging modules, etcd's api/client/pkg)
with local directories. So each binary is built from a small generated wrapper module that
requires the upstream module and replaces every such sibling with its published release
(``k8s.io/api`` ``v0.34.x`` for Kubernetes ``v1.34.x``; the same version for etcd). The list is
read from the upstream go.mod, never written by hand. Wrappers and binaries live in
``CACHE/kube``; the binaries are built once per pinned version.

The control plane runs without controller-manager or scheduler: tests set workload status
themselves, namespaces stay ``Terminating`` after deletion and nothing garbage-collects
owned objects. The admin identity is a static token (``--token-auth-file``) in group
``system:masters``; a ServiceAccount's identity is a token minted through the TokenRequest
API, so a client using it has exactly the RBAC granted to that ServiceAccount.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.common import (
    CACHE,
    HOST,
    Running,
    ServerError,
    env_port,
    file_lock,
    pid_alive,
    port_open,
    read_live_info,
    read_pid,
    run_dir,
    spawn,
    stop_pid,
    wait_until,
    write_info,
)

KUBERNETES_VERSION = "v1.34.10"
# The etcd release kubeadm v1.34.10 deploys (DefaultEtcdVersion in cmd/kubeadm/app/constants).
ETCD_VERSION = "v3.6.5"
NAME = "kube"
BUILD_DIR = CACHE / "kube"
ADMIN_USER = "weir-admin"
# The issuer a real cluster uses, so tokens look like in-cluster ones to code that inspects them.
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"


# --- building --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One binary built from one upstream module through a generated wrapper module."""

    binary: str
    module: str
    version: str
    package: str
    sibling_version: str  # the release that stands in for each sibling the upstream go.mod replaces locally

    @property
    def path(self) -> Path:
        return BUILD_DIR / "bin" / f"{self.binary}-{self.version}"

    def ldflags(self, commit: str) -> str:
        flags = ["-s", "-w"]
        if self.binary == "kube-apiserver":
            major, minor = self.version.removeprefix("v").split(".")[:2]
            pkg = "k8s.io/component-base/version"
            # Without these the server reports v0.0.0-master and its compatibility-version
            # checks and `kubectl version` skew warnings go wrong.
            flags += [
                f"-X {pkg}.gitVersion={self.version}",
                f"-X {pkg}.gitMajor={major}",
                f"-X {pkg}.gitMinor={minor}",
                f"-X {pkg}.gitTreeState=clean",
            ]
            if commit:
                flags.append(f"-X {pkg}.gitCommit={commit}")
        elif commit:
            flags.append(f"-X go.etcd.io/etcd/api/v3/version.GitSHA={commit[:10]}")
        return " ".join(flags)


TARGETS = (
    _Target("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, "go.etcd.io/etcd/server/v3", ETCD_VERSION),
    _Target(
        "kube-apiserver",
        "k8s.io/kubernetes",
        KUBERNETES_VERSION,
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "v0." + KUBERNETES_VERSION.removeprefix("v1."),
    ),
)


def _go() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", str(Path.home() / "go/bin/go")) if Path(p).exists()), None
    )
    if found is None:
        raise ServerError(
            "no `go` on PATH (nor /usr/local/go/bin/go): building kube-apiserver and etcd "
            "needs Go >= 1.24 (https://go.dev/dl/)"
        )
    return found


def _run_go(args: list[str], cwd: Path, log: Path) -> str:
    """Run a go command, its stderr appended to the build log; return stdout or raise with the log tail."""
    env = {**os.environ, "CGO_ENABLED": "0"}
    with open(log, "a") as fh:
        fh.write(f"\n$ (cd {cwd} && {' '.join(args)})\n")
        fh.flush()
        done = subprocess.run(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=fh, text=True, check=False
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise ServerError(f"`{' '.join(args[:3])}` failed (exit {done.returncode}); build log {log}:\n{tail}")
    return done.stdout


def _wrapper_go_mod(target: _Target, upstream_mod: Path, go: str, src: Path, log: Path) -> str:
    """The wrapper's go.mod: require the upstream module, pin each locally-replaced sibling to a release."""
    parsed = json.loads(_run_go([go, "mod", "edit", "-json", str(upstream_mod)], src, log))
    required = {r["Path"] for r in parsed.get("Require") or []}
    # A local replacement has a directory and no version; etcd also "replaces" modules it
    # forbids with a missing directory, which nothing requires, so only required ones count.
    siblings = sorted(
        r["Old"]["Path"]
        for r in parsed.get("Replace") or []
        if "Version" not in r["New"]
        and r["New"]["Path"].startswith((".", "/"))
        and r["Old"]["Path"] in required
    )
    godebug = re.findall(r"^godebug\s+\S+=\S+\s*$", upstream_mod.read_text(), flags=re.MULTILINE)
    replace = "\n".join(f"\t{m} => {m} {target.sibling_version}" for m in siblings)
    return (
        f"// Generated by tests/harness/kube.py: builds {target.package} {target.version}.\n"
        f"module weir.test/build/{target.binary}\n\ngo {parsed['Go']}\n\n"
        + "".join(line.strip() + "\n\n" for line in godebug)
        + f"require {target.module} {target.version}\n\n"
        + (f"replace (\n{replace}\n)\n" if siblings else "")
    )


def _build(target: _Target, go: str) -> float:
    started = time.monotonic()
    src = BUILD_DIR / "src" / f"{target.binary}-{target.version}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    log = BUILD_DIR / "build.log"
    print(
        f"weir: building {target.binary} {target.version} from Go modules (once; log: {log})",
        file=sys.stderr,
        flush=True,
    )
    module = f"{target.module}@{target.version}"
    download = json.loads(_run_go([go, "mod", "download", "-json", module], src, log))
    if download.get("Error"):
        raise ServerError(f"fetching {module} failed: {download['Error']}")
    info = json.loads(Path(download["Info"]).read_text())
    commit = str((info.get("Origin") or {}).get("Hash", ""))
    (src / "go.mod").write_text(_wrapper_go_mod(target, Path(download["GoMod"]), go, src, log))
    # A build-tagged import keeps `go mod tidy` from dropping the requirement; the file never compiles.
    (src / "tools.go").write_text(f'//go:build tools\n\npackage tools\n\nimport _ "{target.package}"\n')
    _run_go([go, "mod", "tidy"], src, log)
    out = target.path.with_name(target.path.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_go(
        [go, "build", "-trimpath", "-ldflags", target.ldflags(commit), "-o", str(out), target.package],
        src,
        log,
    )
    out.replace(target.path)
    seconds = time.monotonic() - started
    with open(log, "a") as fh:
        fh.write(f"built {target.path} in {seconds:.0f}s\n")
    return seconds


def ensure_built() -> dict[str, Path]:
    """Paths of the kube-apiserver and etcd binaries, building those not yet in the cache."""
    paths = {t.binary: t.path for t in TARGETS}
    if all(p.exists() for p in paths.values()):
        return paths
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with file_lock(BUILD_DIR):
        go = None
        # One at a time: these machines have two cores and each build uses both.
        for target in TARGETS:
            if not target.path.exists():
                go = go or _go()
                _build(target, go)
    return paths


# --- certificates and identities ------------------------------------------------------------------


def _openssl(args: list[str], cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerError("no `openssl` on PATH: it makes the test CA and keys (apt-get install openssl)")
    done = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServerError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr}")


SERVER_CERT_EXTENSIONS = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1
"""


def _ensure_pki(pki: Path) -> None:
    """A CA, a serving certificate, the ServiceAccount signing key and the admin token, made once.

    Kept across restarts so that an exported KUBECONFIG stays valid after `make kube-down kube-up`.
    The openssl CLI makes them: it is on every machine that has Python, unlike `cryptography`.
    """
    wanted = ("ca.crt", "server.crt", "server.key", "sa.key", "sa.pub", "tokens.csv")
    if all((pki / name).exists() for name in wanted):
        return
    tmp = pki.with_name(pki.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "server.ext").write_text(SERVER_CERT_EXTENSIONS)
    # Every argument is free of spaces, so each command reads as the shell line it is.
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=weir-test-ca"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        "req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=kube-apiserver",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out server.crt"
        " -extfile server.ext",
        "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key",
        "pkey -in sa.key -pubout -out sa.pub",
    ):
        _openssl(command.split(), tmp)
    # token,user,uid,"groups": system:masters is the superuser group RBAC always allows.
    token = secrets.token_urlsafe(32)
    (tmp / "tokens.csv").write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    for key in tmp.glob("*.key"):
        key.chmod(0o600)
    (tmp / "tokens.csv").chmod(0o600)
    shutil.rmtree(pki, ignore_errors=True)
    tmp.rename(pki)


def _admin_token(pki: Path) -> str:
    return (pki / "tokens.csv").read_text().split(",", 1)[0]


def write_kubeconfig(
    path: Path, server: str, ca: Path, user: str, token: str, namespace: str | None = None
) -> Path:
    """A self-contained kubeconfig (CA embedded) for a bearer-token identity."""
    import yaml

    context: dict[str, str] = {"cluster": "weir-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "weir-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}@weir-test", "context": context}],
        "current-context": f"{user}@weir-test",
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def api_client(kubeconfig: Path | str) -> Any:
    """A ``kubernetes.client.ApiClient`` for ``kubeconfig``; use it as a context manager so it is closed."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def service_account_kubeconfig(
    running: Running, namespace: str, name: str, expiration_seconds: int = 24 * 3600
) -> Path:
    """A kubeconfig acting as ServiceAccount ``namespace/name``, with exactly the RBAC it is granted.

    The token comes from the TokenRequest API, as a pod's projected token does; the
    ServiceAccount must exist (create it, or install the chart that does, first).
    """
    from kubernetes import client

    with api_client(running.info["kubeconfig"]) as api:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        minted = client.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
    token = minted.status.token if minted.status else None
    if not token:
        raise ServerError(f"TokenRequest for {namespace}/{name} returned no token")
    user = f"system:serviceaccount:{namespace}:{name}"
    path = running.run_dir / "sa" / f"{namespace}.{name}.kubeconfig"
    path.parent.mkdir(exist_ok=True)
    return write_kubeconfig(
        path, running.info["server"], Path(running.info["ca"]), user, token, namespace=namespace
    )


# --- running ---------------------------------------------------------------------------------------


def _etcd_dir() -> Path:
    return run_dir(f"{NAME}/etcd")


def _get(url: str, ca: Path | None = None, token: str | None = None, timeout: float = 2.0) -> str:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), context=context, timeout=timeout
        ) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        # The error holds the open response; left to the garbage collector it becomes a
        # ResourceWarning, which this suite turns into an error in whichever test is running.
        body = exc.read().decode(errors="replace")
        exc.close()
        raise ServerError(f"GET {url}: HTTP {exc.code}: {body[:300]}") from None


def _apiserver_ready(info: dict[str, Any]) -> bool:
    pki = Path(info["ca"]).parent
    return _get(f"{info['server']}/readyz", Path(info["ca"]), _admin_token(pki)).strip() == "ok"


def _log_tails(lines: int = 60) -> str:
    """The last lines each process wrote since its latest start (spawn() appends runs to one log)."""
    out = []
    logs = (("kube-apiserver", run_dir(NAME) / "server.log"), ("etcd", _etcd_dir() / "server.log"))
    for title, log in logs:
        try:
            text = log.read_text(errors="replace").splitlines()
        except OSError:
            text = ["(no log)"]
        starts = [i for i, line in enumerate(text) if line.startswith("=== ")]
        run = text[starts[-1] :] if starts else text
        out.append(f"--- {title} log tail ({log}) ---\n" + "\n".join(run[-lines:]))
    return "\n".join(out)


def _healthy(info: dict[str, Any]) -> bool:
    etcd_pid = read_pid(_etcd_dir())
    if etcd_pid is None or not pid_alive(etcd_pid):
        return False
    try:
        return _apiserver_ready(info)
    except Exception:  # noqa: BLE001 - any failure to answer means "start a fresh one"
        return False


def _etcd_command(binary: Path, data: Path, client_port: int) -> list[str]:
    client_url, peer_url = f"http://{HOST}:{client_port}", f"http://{HOST}:{client_port + 1}"
    return [
        str(binary),
        "--name=weir-test",
        f"--data-dir={data}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=weir-test={peer_url}",
        # Test data is thrown away at the next start: fsync buys nothing and slows every write.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def _apiserver_command(binary: Path, pki: Path, port: int, etcd_port: int) -> list[str]:
    # envtest's minimal set, plus a static admin token and the TokenRequest signing keys.
    return [
        str(binary),
        f"--etcd-servers=http://{HOST}:{etcd_port}",
        f"--bind-address={HOST}",
        f"--advertise-address={HOST}",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'server.crt'}",
        f"--tls-private-key-file={pki / 'server.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--token-auth-file={pki / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        # No controller-manager creates each namespace's `default` ServiceAccount, so this
        # admission plugin would refuse every pod; envtest turns it off for the same reason.
        "--disable-admission-plugins=ServiceAccount",
        # Endpoints may not hold a loopback address, so reconciling the `kubernetes` Service's
        # endpoints to 127.0.0.1 fails and logs an error every ten seconds; no pod could use them.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
    ]


def up() -> Running:
    """Start etcd and kube-apiserver (building them on first use), or reuse the pair recorded as running."""
    rdir = run_dir(NAME)
    with file_lock(rdir):
        info = read_live_info(rdir)
        if info is not None and _healthy(info):
            return Running(NAME, info, rdir, started_here=False)
        _stop_both(rdir)
        binaries = ensure_built()
        port = env_port("WEIR_KUBE_PORT", 16443)
        etcd_port = env_port("WEIR_ETCD_PORT", 12379)
        wanted = ((port, "WEIR_KUBE_PORT"), (etcd_port, "WEIR_ETCD_PORT"), (etcd_port + 1, "WEIR_ETCD_PORT"))
        for p, var in wanted:
            if port_open(p):
                raise ServerError(
                    f"port {p} is taken by another process; set {var} to a free port "
                    "(etcd uses WEIR_ETCD_PORT and the port after it)"
                )
        pki = rdir / "pki"
        _ensure_pki(pki)
        started = time.monotonic()
        edir = _etcd_dir()
        shutil.rmtree(edir / "data", ignore_errors=True)
        etcd_pid = spawn(_etcd_command(binaries["etcd"], edir / "data", etcd_port), edir)
        server = f"https://{HOST}:{port}"
        info = {
            "server": server,
            "kubeconfig": str(rdir / "kubeconfig"),
            "ca": str(pki / "ca.crt"),
            "port": port,
            "etcd": f"http://{HOST}:{etcd_port}",
            "version": KUBERNETES_VERSION,
            "etcd_version": ETCD_VERSION,
        }
        try:
            _wait_for(etcd_pid, "etcd", lambda: '"health":"true"' in _get(f"{info['etcd']}/health"), 30)
            apiserver_pid = spawn(_apiserver_command(binaries["kube-apiserver"], pki, port, etcd_port), rdir)
            _wait_for(apiserver_pid, "kube-apiserver", lambda: _apiserver_ready(info), 90)
        except ServerError as exc:
            message = f"{str(exc).splitlines()[0]}\n{_log_tails()}"
            _stop_both(rdir)
            raise ServerError(message) from None
        write_kubeconfig(rdir / "kubeconfig", server, pki / "ca.crt", ADMIN_USER, _admin_token(pki))
        info["startup_seconds"] = round(time.monotonic() - started, 1)
        write_info(rdir, info)
        return Running(NAME, info, rdir, started_here=True)


def _exited(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or already reaped): ask the kernel
        return not pid_alive(pid)
    return reaped == pid


def _wait_for(pid: int, what: str, ready: Callable[[], bool], timeout: float) -> None:
    """Wait until ``ready``; a process that exits instead fails at once rather than at the timeout."""
    wait_until(lambda: _exited(pid) or ready(), timeout, f"{what} readiness")
    if _exited(pid) or not pid_alive(pid):
        raise ServerError(f"{what} exited during start-up")


def _stop_both(rdir: Path) -> None:
    stop_pid(rdir)
    stop_pid(_etcd_dir())


def down() -> None:
    """Stop kube-apiserver, then etcd (the API server's shutdown still talks to etcd)."""
    _stop_both(run_dir(NAME))


def describe(r: Running) -> str:
    return (
        f"kube-apiserver {r.info['version']} with etcd {r.info['etcd_version']} "
        f"(RBAC on; no controller-manager or scheduler): {r.info['server']}\n"
        f"  export KUBECONFIG={r.info['kubeconfig']}   # admin (system:masters)\n"
        f"  logs: {r.log}, {_etcd_dir() / 'server.log'}"
    )


# --- pytest ----------------------------------------------------------------------------------------

_build_error: ServerError | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control plane before the first test that needs it, outside per-test timeouts.

    The first build takes many minutes; inside a fixture it would run into the test's timeout.
    """
    global _build_error
    if session.config.option.collectonly:
        return
    wanted = any(
        item.get_closest_marker("kube") or "kube" in getattr(item, "fixturenames", ())
        for item in session.items
    )
    if not wanted or all(t.path.exists() for t in TARGETS):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"weir: building kube-apiserver {KUBERNETES_VERSION} and etcd {ETCD_VERSION} "
            f"from Go modules into {BUILD_DIR} (first run only)"
        )
    try:
        ensure_built()
    except ServerError as exc:
        _build_error = exc


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Running]:
    """The real kube-apiserver: ``.info["kubeconfig"]`` (admin), ``["server"]``, ``["ca"]``.

    Reuses one that is already up (``make kube-up``) and leaves it running; one started here
    is stopped when the session ends. A control plane that cannot be built or started fails
    the tests that need it, with the server logs; it never skips them.
    """
    if _build_error is not None:
        pytest.fail(str(_build_error), pytrace=False)
    try:
        running = up()
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield running
    finally:
        if request.session.testsfailed:
            print(f"\n{_log_tails()}")
        if running.started_here:
            down()
