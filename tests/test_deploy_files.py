"""The deploy/ folder: its YAML parses and has the shape its tools require, every `splitserve` command line in
it parses with the real CLI and carries no Redis password (`splitserve up` reads the workers' and the router's
Redis URLs from SPLITSERVE_REDIS_URL and SPLITSERVE_ROUTER_REDIS_URL, which the launcher's env file and the
KubeRay head's Secret provide), and its Redis settings hold against a real redis-server (started with
deploy/redis/redis.conf and users.acl) under a real worker publisher and a real router mirror.

TLS is configuration only here: the bundled redis-server is built without it, so the `tls-*` lines are the
one part of redis.conf the server below does not load.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from waiting import wait_until

from splitserve.cli import build_parser
from splitserve.cluster.spec import ClusterSpec
from splitserve.engine.block_hash import BlockHash, HashContext, hash_blocks
from splitserve.engine.block_pool import BlockEvent, BlockEventKind, Holdings
from splitserve.index.config import REDIS_URL_ENV, ROUTER_REDIS_URL_ENV, IndexConfig
from splitserve.index.mirror import IndexMirror
from splitserve.index.publisher import IndexPublisher
from splitserve.index.redis_server import EmbeddedRedis
from splitserve.index.schema import WorkerInfo, probe_hash

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ACL_FILE = DEPLOY / "redis" / "users.acl"
CONF_FILE = DEPLOY / "redis" / "redis.conf"
RAY_CONFIG = DEPLOY / "ray" / "cluster.yaml"
KUBERAY = DEPLOY / "kuberay" / "raycluster.yaml"

# Values for shell variables in deploy/ command lines. They hold passwords: a command line that expands one
# shows the password in `ps`, and test_no_splitserve_up_command_in_deploy_has_a_redis_password catches it.
DUMMIES = {REDIS_URL_ENV: "rediss://splitserve-worker:pw@redis.splitserve.internal:6380/0",
           ROUTER_REDIS_URL_ENV: "rediss://splitserve-router:pw@redis.splitserve.internal:6380/0"}
ROLE_USERS = ("splitserve-worker", "splitserve-router")
# The environment variable `splitserve up` reads each user's URL from.
URL_ENV = {"splitserve-worker": REDIS_URL_ENV, "splitserve-router": ROUTER_REDIS_URL_ENV}
PASSWORDS = {"splitserve-worker": "worker-test-pw", "splitserve-router": "router-test-pw"}
ENV_FILE = "~/.splitserve-secrets/splitserve.env"  # what the launcher's `up` command sources
BLOCK_SIZE = 4


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def fenced_code(markdown: str) -> str:
    return "\n".join(re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", markdown, flags=re.M | re.S))


# -- YAML ------------------------------------------------------------------------------------------------


def test_every_yaml_file_parses_into_mappings():
    paths = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert set(paths) >= {RAY_CONFIG, KUBERAY}
    for path in paths:
        docs = yaml_docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_ray_launcher_config_passes_the_launchers_own_validation():
    config = yaml_docs(RAY_CONFIG)[0]
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(config)))  # what `ray up` checks first
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert sum(t["min_workers"] for t in workers) == num_members(up_command(RAY_CONFIG))


def test_kuberay_manifest_has_a_gpu_raycluster_its_secret_and_the_router_service():
    docs = {doc["kind"]: doc for doc in yaml_docs(KUBERAY)}
    cluster, secret, service = docs["RayCluster"], docs["Secret"], docs["Service"]
    assert cluster["apiVersion"] == "ray.io/v1"
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and sum(g["replicas"] for g in gpu_groups) == num_members(up_command(KUBERAY))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    container_ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    assert {(p["port"], container_ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        (50051, 50051), (8000, 8000)}
    refs = list(_find(cluster, "secretKeyRef")) + list(_find(cluster, "secret"))
    assert refs and {ref.get("name", ref.get("secretName")) for ref in refs} == {secret["metadata"]["name"]}
    keys = {ref["key"] for ref in refs if "key" in ref}
    keys |= {item["key"] for ref in refs for item in ref.get("items", ())}
    assert keys <= set(secret["stringData"])


def test_kuberay_head_gets_both_redis_urls_from_the_secret_and_up_reads_them():
    docs = {doc["kind"]: doc for doc in yaml_docs(KUBERAY)}
    cluster, secret = docs["RayCluster"], docs["Secret"]
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {var["name"]: var for var in head["env"]}
    urls = {}
    for user, name in URL_ENV.items():
        assert "value" not in env[name], name  # from the Secret, not written into the manifest
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        urls[name] = secret["stringData"][ref["key"]]
        url = parse_url(urls[name])
        assert url["connection_class"] is SSLConnection and url["username"] == user, name
        ca_dirs = {Path(m["mountPath"]) for m in head["volumeMounts"] if m["name"] == "redis-ca"}
        assert Path(url["ssl_ca_certs"]).parent in ca_dirs  # the file the Secret volume provides
    for group in cluster["spec"]["workerGroupSpecs"]:  # GPU pods: their workers get their URL from `up`
        for container in group["template"]["spec"]["containers"]:
            assert not {var["name"] for var in container.get("env", ())} & set(URL_ENV.values())
    assert_up_hands_out(up_command(KUBERAY), urls)


def test_the_launchers_env_file_exports_both_redis_urls_and_up_reads_them(tmp_path):
    """deploy/README.md's splitserve.env, sourced by bash as the launcher's `ray exec` line does."""
    readme = (DEPLOY / "README.md").read_text()
    lines = [line.strip() for line in fenced_code(readme).splitlines()
             if re.match(r"\s*(export\s+)?SPLITSERVE_\w*REDIS_URL=", line)]
    assert len(lines) == 2, lines
    (tmp_path / "splitserve.env").write_text("\n".join(lines) + "\n")
    result = subprocess.run(["bash", "-c", 'source "$1" && env -0', "_", str(tmp_path / "splitserve.env")],
                            env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True)
    exported = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    urls = {name: exported.get(name) for name in URL_ENV.values()}  # None: not exported, unseen by `up`
    config = yaml_docs(RAY_CONFIG)[0]
    for user, name in URL_ENV.items():
        assert urls[name] is not None, f"{name} is not exported"
        url = parse_url(urls[name])
        assert url["connection_class"] is SSLConnection and url["username"] == user, name
        # ~/.splitserve-secrets/ca.crt, which file_mounts copies to every node (the GPU nodes keep it)
        home = Path("/home") / config["auth"]["ssh_user"]
        assert Path(url["ssl_ca_certs"]) == home / ".splitserve-secrets" / "ca.crt"
    assert "~/.splitserve-secrets" in config["file_mounts"]
    for path in (RAY_CONFIG, DEPLOY / "README.md"):  # the `up` that joins the Ray cluster sources the file
        text = _CONTINUATION.sub(" ", path.read_text())
        ups = re.findall(r"(source \S+ && )?splitserve up\b[^'\n]*--ray-address auto", text)
        assert ups == [f"source {ENV_FILE} && "], path
    assert_up_hands_out(up_command(RAY_CONFIG), urls)


def parse_up(argv: list[str], env: dict[str, str | None]) -> Any:
    """`splitserve up`'s arguments as the CLI parses them in a process whose Redis variables are `env`."""
    assert argv[0] == "up"
    with mock.patch.dict(os.environ):
        for name in (REDIS_URL_ENV, ROUTER_REDIS_URL_ENV):
            os.environ.pop(name, None)
            if env.get(name) is not None:
                os.environ[name] = env[name]
        return build_parser().parse_args(argv)


def assert_up_hands_out(up_argv: list[str], urls: dict[str, str]) -> None:
    """`up_argv`, run with `urls` in its environment, gives the workers the worker URL and the router the
    router URL, each in its process's SPLITSERVE_REDIS_URL and neither on a command line."""
    args = parse_up(up_argv, urls)
    assert (args.redis_url, args.router_redis_url) == (urls[REDIS_URL_ENV], urls[ROUTER_REDIS_URL_ENV])
    spec = ClusterSpec(model="/m", redis_url=args.redis_url, router_redis_url=args.router_redis_url)
    router, workers = spec.router(args.redis_url), spec.workers(args.redis_url)  # as cluster/launcher.py
    assert dict(router.env) == {REDIS_URL_ENV: urls[ROUTER_REDIS_URL_ENV]}
    assert workers and all(dict(w.env) == {REDIS_URL_ENV: urls[REDIS_URL_ENV]} for w in workers)
    assert not any(url in arg for m in (router, *workers) for arg in m.args for url in urls.values())


def _find(node: Any, key: str) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, dict):
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _find(item, key)


def test_shell_in_the_yaml_is_valid_bash():
    config = yaml_docs(RAY_CONFIG)[0]
    scripts = [cmd for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands") for cmd in config[key]]
    for doc in yaml_docs(KUBERAY):
        for template in _find(doc, "template"):
            for c in template["spec"]["containers"]:
                assert c["command"] == ["/bin/bash", "-lc", "--"], c["name"]
                scripts += c["args"]
                if "lifecycle" in c:
                    scripts.append(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert len(scripts) > 10
    for script in scripts:
        result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}\n{result.stderr}"


# -- splitserve command lines ----------------------------------------------------------------------------

_COMMAND = re.compile(r"(?<![\w/.-])splitserve (?:up|down|status|generate)\b")
_CONTINUATION = re.compile(r"\\\n[ \t]*(?:#[ \t]*)?")  # shell `\` newline, also inside YAML comments


def command_lines(path: Path) -> list[str]:
    """Every `splitserve up|down|status|generate ...` command in a deploy file, continuation lines joined,
    cut where its enclosing quote closes. Markdown counts only in fenced code; inline backticks are prose."""
    text = path.read_text()
    if path.suffix == ".md":
        text = fenced_code(text)
    commands = []
    for line in _CONTINUATION.sub(" ", text).splitlines():
        for match in _COMMAND.finditer(line):
            quote = _open_quote(line[: match.start()])
            if quote != "`":
                rest = line[match.start():]
                commands.append(rest.split(quote, 1)[0] if quote else rest)
    return commands


def _open_quote(prefix: str) -> str | None:
    open_quote = None
    for ch in prefix:
        if open_quote is None and ch in "'\"`":
            open_quote = ch
        elif ch == open_quote:
            open_quote = None
    return open_quote


def argv_of(command: str) -> list[str]:
    """The arguments after `splitserve`, up to the first shell operator or comment, variables replaced."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argv = []
    for token in lexer:
        if set(token) <= set(lexer.punctuation_chars):
            break
        unknown = set(re.findall(r"\$\{?(\w+)", token)) - DUMMIES.keys()
        assert not unknown, f"add a dummy value for ${unknown.pop()} (in {command!r})"
        argv.append(re.sub(r"\$\{?(\w+)\}?", lambda m: DUMMIES[m.group(1)], token))
    return argv[1:]


def parse_error(argv: list[str]) -> str | None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(argv)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    return None


def up_command(path: Path) -> list[str]:
    (argv,) = [argv for argv in map(argv_of, command_lines(path)) if argv[0] == "up"]
    return argv


def num_members(up_argv: list[str]) -> int:
    """The GPU workers an `up` command asks for (each takes one GPU)."""
    flags = ("--fresh-prefill", "--warm-prefill", "--decode")
    return sum(int(up_argv[up_argv.index(flag) + 1]) for flag in flags)


def test_command_extraction_joins_lines_and_stops_at_quotes_operators_and_prose(tmp_path):
    sample = tmp_path / "x.yaml"
    sample.write_text("#   ray exec c.yaml 'source e && splitserve up \\\n#     --model /m --redis-url"
                      " \"$SPLITSERVE_REDIS_URL\" --detach' # done\n"
                      "args: [\"splitserve status --json; echo\"]\n"
                      "# then `splitserve up --detach` starts it\n")
    assert [argv_of(c) for c in command_lines(sample)] == [
        ["up", "--model", "/m", "--redis-url", DUMMIES["SPLITSERVE_REDIS_URL"], "--detach"],
        ["status", "--json"]]


def redis_passwords_on_command_line(up_argv: list[str]) -> list[str]:
    """The flags of `up_argv` (as the CLI parses them, environment aside) that carry a Redis URL with a
    password: `ps` would show it to every user of the machine."""
    args = parse_up(up_argv, {})
    given = (("--redis-url", args.redis_url), ("--router-redis-url", args.router_redis_url))
    return [flag for flag, value in given if value is not None and parse_url(value).get("password")]


def test_the_password_check_catches_urls_and_variables_on_the_command_line(tmp_path):
    sample = tmp_path / "x.md"
    sample.write_text("```\nsplitserve up --model /m --redis-url \"$SPLITSERVE_REDIS_URL\"\n"
                      "splitserve up --model /m --router-redis-url=redis://splitserve-router:pw@h:1/0\n"
                      "splitserve up --model /m --redis-u rediss://u:pw@h:1/0 --detach\n"
                      "splitserve up --model /m --redis-url unix:///run/redis.sock --detach\n"
                      "splitserve up --model /m --detach\n```\n")
    assert [redis_passwords_on_command_line(argv_of(c)) for c in command_lines(sample)] == [
        ["--redis-url"], ["--router-redis-url"], ["--redis-url"], [], []]


def test_no_splitserve_up_command_in_deploy_has_a_redis_password():
    ups = [(path, argv) for path in sorted(DEPLOY.rglob("*")) if path.is_file()
           for argv in map(argv_of, command_lines(path)) if argv[0] == "up"]
    assert len(ups) >= 4  # README (one machine, launcher), ray/cluster.yaml, kuberay/raycluster.yaml
    found = [f"{path.relative_to(DEPLOY)}: splitserve {shlex.join(argv)}: {flags}" for path, argv in ups
             if (flags := redis_passwords_on_command_line(argv))]
    assert not found, "\n".join(found)


def test_every_splitserve_command_in_deploy_parses_with_the_cli():
    found = {path: command_lines(path) for path in sorted(DEPLOY.rglob("*")) if path.is_file()}
    with_up = {path.relative_to(DEPLOY).as_posix() for path, cmds in found.items()
               if any(argv_of(c)[0] == "up" for c in cmds)}
    assert with_up == {"README.md", "ray/cluster.yaml", "kuberay/raycluster.yaml"}
    errors = [f"{path.relative_to(DEPLOY)}: splitserve {shlex.join(argv)}\n    {error}"
              for path, cmds in found.items() for argv in map(argv_of, cmds) if (error := parse_error(argv))]
    assert not errors, "\n".join(errors)


# -- Redis: the shipped ACL and config on a real server ----------------------------------------------------


def acl_rules() -> dict[str, list[str]]:
    lines = ACL_FILE.read_text().splitlines()
    assert all(line.startswith("user ") for line in lines)  # Redis takes nothing else, not even comments
    return {line.split()[1]: line.split()[2:] for line in lines}


def test_acl_file_has_placeholder_passwords_and_grants_no_wildcards():
    rules = acl_rules()
    assert set(rules) == {"default", "splitserve-worker", "splitserve-router"}
    assert "off" in rules["default"] and not any(r.startswith((">", "#", "~", "+")) or r == "nopass"
                                                 for r in rules["default"])
    for user in ROLE_USERS:
        user_rules = rules[user]
        assert [r for r in user_rules if r.startswith((">", "#"))] == [f">CHANGE-ME-{user.split('-')[1]}"]
        assert [r for r in user_rules if r.startswith(("~", "%", "allkeys"))] == ["~spx:*"]
        assert user_rules.index("-@all") < min(i for i, r in enumerate(user_rules) if r.startswith("+"))
        assert not {"+@all", "allcommands", "nopass"} & set(user_rules)


def test_deploy_files_use_only_the_role_users():
    """Every Redis user a deploy file names, in a URL or an ACL line, is one of users.acl's role users (or
    the README's `USER` placeholder): no other user to create, no user with both grants."""
    named = set()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            text = path.read_text()
            named |= set(re.findall(r"\b(?:rediss?|unix)://([^:@/\s'\"]+):[^@\s]*@", text))
            named |= set(re.findall(r"^[ \t]*user (\S+) (?:on|off)\b", text, flags=re.M))
    assert named - {"USER"} == {"default", *ROLE_USERS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """redis-server with the shipped redis.conf (minus TLS) and users.acl (test passwords), on a free
    loopback port."""
    tmp = tmp_path_factory.mktemp("deploy-redis")
    acl = ACL_FILE.read_text()
    for user, password in PASSWORDS.items():
        acl = acl.replace(f">CHANGE-ME-{user.split('-')[1]}", f">{password}")
    assert "CHANGE-ME" not in acl
    (tmp / "users.acl").write_text(acl)
    conf = CONF_FILE.read_text().splitlines()
    (tmp / "redis.conf").write_text("\n".join(line for line in conf if not line.startswith("tls-")) + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Options after the included file override it: a port instead of TLS, the test ACL file.
    extra = ("--include", str(tmp / "redis.conf"), "--port", str(port), "--aclfile", str(tmp / "users.acl"))
    with EmbeddedRedis(port=port, extra_args=extra) as embedded:
        yield embedded


def client(server: EmbeddedRedis, user: str | None, password: str | None = None, **options) -> redis.Redis:
    """No retries: redis-py retries a refused AUTH (a ConnectionError) with backoff by default."""
    password = password or PASSWORDS.get(user or "")
    return redis.Redis(host=server.host, port=server.port, username=user, password=password,
                       retry=Retry(NoBackoff(), 0), **options)


def url(server: EmbeddedRedis, user: str) -> str:
    return f"redis://{user}:{PASSWORDS[user]}@{server.host}:{server.port}/0"


def test_the_shipped_conf_is_tls_only_and_runs_without_persistence_or_eviction(server):
    conf = CONF_FILE.read_text().splitlines()
    assert {"port 0", "tls-port 6380", 'save ""', "appendonly no", "protected-mode yes"} <= set(conf)
    assert any(line.startswith("aclfile ") for line in conf)
    info = client(server, "splitserve-router").info()
    assert info["maxmemory_policy"] == "noeviction" and info["maxmemory"] > 0
    assert info["aof_enabled"] == 0


SETTINGS = {"lease_ttl_s": 1.5, "lease_check_s": 0.1, "socket_timeout_s": 0.5, "retry_backoff_s": 0.02,
            "retry_max_backoff_s": 0.2}


def test_a_worker_publishes_and_a_router_mirrors_under_the_acl(server):
    """The publisher as splitserve-worker (SPLITSERVE_REDIS_URL), the mirror as splitserve-router
    (SPLITSERVE_ROUTER_REDIS_URL): what `splitserve up` gives the workers and the router."""
    worker_config = IndexConfig(url(server, "splitserve-worker"), **SETTINGS)
    router_config = IndexConfig(url(server, "splitserve-router"), **SETTINGS)
    assert worker_config.namespace == "spx"  # the prefix users.acl confines both users to
    worker_id = "w-acl"
    held: set[BlockHash] = set()
    info = WorkerInfo(worker_id, "fresh", "127.0.0.1:5000", "m", BLOCK_SIZE, probe_hash("m", BLOCK_SIZE))
    hashes = hash_blocks(list(range(6 * BLOCK_SIZE)), BLOCK_SIZE, HashContext("m"))
    mirror, late = IndexMirror(router_config), IndexMirror(router_config)
    publisher = IndexPublisher(worker_config, info, snapshot=lambda: Holdings(list(held), []))
    try:
        assert mirror.start()  # rebuild: INFO, XREVRANGE, SMEMBERS
        publisher.start()
        assert publisher.wait_registered(5.0)  # MULTI: EVAL (prune), SET PX, SADD, DEL, PEXPIRE, XADD
        held.update(hashes)
        publisher.on_block_event(BlockEvent(BlockEventKind.STORED, tuple(hashes)))
        wait_until(lambda: mirror.match(hashes) == {worker_id: 6})  # XREAD, then GET + SMEMBERS on "R"
        held.difference_update(hashes[4:])
        publisher.on_block_event(BlockEvent(BlockEventKind.EVICTED, tuple(hashes[4:])))
        wait_until(lambda: mirror.match(hashes) == {worker_id: 4})
        time.sleep(1.5 * worker_config.lease_ttl_s)  # heartbeats renew the lease, mirrors reconcile (MGET)
        assert mirror.match(hashes) == {worker_id: 4}
        assert late.start() and late.match(hashes) == {worker_id: 4}  # a full rebuild with a live worker
        publisher.stop()  # deregisters: DEL, SREM, XADD
        wait_until(lambda: mirror.workers() == {}, timeout_s=worker_config.lease_ttl_s / 2)
        assert publisher.stats["failures"] == 0  # the publisher swallows errors: a refusal would count here
        assert mirror.stats["failures"] == 0 and late.stats["failures"] == 0
    finally:
        publisher.stop()
        mirror.stop()
        late.stop()


def test_the_router_cannot_mirror_as_the_worker_user(server):
    """Why the router needs its own URL: the worker user may not read the index the way a mirror does."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        client(server, "splitserve-worker").info()
    mirror = IndexMirror(IndexConfig(url(server, "splitserve-worker"), **SETTINGS))
    try:
        assert not mirror.start()
        assert mirror.stats["failures"] >= 1 and mirror.workers() == {}
    finally:
        mirror.stop()


WRITES: dict[str, Callable[[redis.Redis], object]] = {
    "set": lambda r: r.set("spx:lease:evil", b"x"),
    "sadd": lambda r: r.sadd("spx:workers", "evil"),
    "xadd": lambda r: r.xadd("spx:events", {b"r": b"x"}),
    "del": lambda r: r.delete("spx:workers"),
    "pexpire": lambda r: r.pexpire("spx:workers", 1),
    "eval": lambda r: r.eval("return redis.call('SET', KEYS[1], 'x')", 1, "spx:lease:evil"),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_the_router_user_cannot_write_the_index(server, write):
    router = client(server, "splitserve-router")
    assert router.get("spx:lease:evil") is None  # authenticated, and may read: the refusal is the write
    with pytest.raises(redis.exceptions.NoPermissionError):
        write(router)


# Per user: a command it may run on an index key, then the same command on a key outside the index.
ALLOWED_OUTSIDE: dict[str, Callable[[redis.Redis, str], object]] = {
    "splitserve-worker": lambda r, key: r.exists(key),
    "splitserve-router": lambda r, key: r.get(key),
}
ADMIN = [("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",), ("DBSIZE",), ("FLUSHALL",), ("CONFIG", "GET", "*"),
         ("ACL", "LIST"), ("SELECT", "1"), ("MONITOR",), ("SHUTDOWN",)]


@pytest.mark.parametrize("user", ALLOWED_OUTSIDE)
def test_no_user_reaches_keys_outside_the_namespace_nor_the_server(server, user):
    r = client(server, user)
    ALLOWED_OUTSIDE[user](r, "spx:workers")
    for key in ("other:key", "spx", "spxother:key", "Spx:workers"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            ALLOWED_OUTSIDE[user](r, key)
    for command in ADMIN:
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*command)
    if user != "splitserve-router":  # a script's own calls are checked against the user's key patterns
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            r.eval("return redis.call('SET', 'other:key', 'x')", 0)
    assert r.ping()


def test_unauthenticated_and_wrong_credentials_are_refused(server):
    for protocol in (2, 3):
        with pytest.raises(redis.exceptions.AuthenticationError):
            client(server, None, protocol=protocol).get("spx:workers")
    for user, password in (("default", "anything"), ("splitserve-worker", "CHANGE-ME-worker"),
                           ("splitserve-worker", PASSWORDS["splitserve-router"]), ("nobody", "x")):
        with pytest.raises(redis.exceptions.AuthenticationError):
            client(server, user, password).ping()
    assert client(server, "splitserve-worker").ping()
