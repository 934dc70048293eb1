"""The container helper scripts, run for real: docker/healthcheck.py (backend and
worker probes), docker/gpu_claim.py (one GPU per worker replica through Redis
claims) and docker/entrypoint.sh (claim, export CUDA_VISIBLE_DEVICES, exec).

Redis is the private redis-server of tests/fixtures/redis_server.py and the
worker probe sees a real RQ worker registration. GPUs are described to the
scripts as nvidia-smi CSV text, so no GPU is needed.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
TWO_GPUS = "0, GPU-aaaa-0000\n1, GPU-bbbb-1111\n"
THREE_GPUS = TWO_GPUS + "2, GPU-cccc-2222\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


healthcheck = load_script("healthcheck")
gpu_claim = load_script("gpu_claim")


def script_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGM_", "CUDA_VISIBLE", "WORKER_GPU"))}
    env.update(PYTHONPATH=str(ROOT), REDIS_URL=redis_url, EGM_QUEUE_PREFIX="deploytest", **extra)
    return env


def run_script(name: str, args: list[str], env: dict[str, str], timeout: float = 60):
    return subprocess.run([sys.executable, str(DOCKER / f"{name}.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_until(predicate, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- backend probe ---------------------------------------------------------------------


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    body = b'{"status": "UP"}'

    def do_GET(self):  # noqa: N802 - http.server naming
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture()
def health_server():
    """A loopback HTTP server whose /health body a test can change."""
    handler = type("Handler", (_HealthHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_backend_url_reaches_wildcard_listeners_on_loopback():
    assert healthcheck.backend_url("0.0.0.0", 9090) == "http://127.0.0.1:9090/health"
    assert healthcheck.backend_url("::", 9091) == "http://127.0.0.1:9091/health"
    assert healthcheck.backend_url("10.1.2.3", 80) == "http://10.1.2.3:80/health"
    assert healthcheck.backend_url("::1", 9090) == "http://[::1]:9090/health"


def test_backend_probe_requires_status_up(health_server):
    server, handler = health_server
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    assert healthcheck.probe_backend(url).healthy
    handler.body = b'{"status": "DOWN"}'
    assert not healthcheck.probe_backend(url).healthy
    handler.body = b"<html>proxy error</html>"
    probe = healthcheck.probe_backend(url)
    assert not probe.healthy and "JSON" in probe.detail


def test_backend_probe_fails_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not healthcheck.probe_backend(f"http://127.0.0.1:{port}/health", timeout_s=1).healthy


def test_backend_healthcheck_command_reads_the_port_from_settings(health_server, redis_url):
    server, _ = health_server
    env = script_env(redis_url, EGM_HOST="0.0.0.0", EGM_PORT=str(server.server_address[1]))
    ok = run_script("healthcheck", ["backend"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("healthy")
    env["EGM_PORT"] = "1"  # nothing listens there
    bad = run_script("healthcheck", ["backend"], env)
    assert bad.returncode == 1 and bad.stdout.startswith("unhealthy")


def test_healthcheck_rejects_unknown_mode(redis_url):
    result = run_script("healthcheck", ["sideways"], script_env(redis_url))
    assert result.returncode == 1 and "usage" in result.stderr


# --- worker probe -----------------------------------------------------------------------


@pytest.fixture()
def rq_worker(redis_url):
    conn = redis.Redis.from_url(redis_url)
    worker = SimpleWorker([Queue("deploytest-bulk", connection=conn)], connection=conn, name="egm-probe-test")
    yield worker
    worker.register_death()


def test_worker_probe_sees_a_registered_worker_of_this_host(redis_url, rq_worker):
    host = socket.gethostname()
    assert not healthcheck.probe_worker(redis_url, host).healthy  # not registered yet
    rq_worker.register_birth()
    probe = healthcheck.probe_worker(redis_url, host)
    assert probe.healthy and "egm-probe-test" in probe.detail
    assert not healthcheck.probe_worker(redis_url, "another-container").healthy
    rq_worker.register_death()
    assert not healthcheck.probe_worker(redis_url, host).healthy


def test_worker_probe_rejects_a_registration_whose_process_is_gone(redis_url, rq_worker):
    rq_worker.register_birth()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    redis.Redis.from_url(redis_url).hset(rq_worker.key, "pid", dead_pid)
    probe = healthcheck.probe_worker(redis_url, socket.gethostname())
    assert not probe.healthy and "process is gone" in probe.detail


def test_worker_probe_reports_unreachable_redis():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = healthcheck.probe_worker(f"redis://127.0.0.1:{port}/0", socket.gethostname())
    assert not probe.healthy and "redis unreachable" in probe.detail


def test_worker_healthcheck_command_exit_status(redis_url, rq_worker):
    env = script_env(redis_url)
    assert run_script("healthcheck", ["worker"], env).returncode == 1
    rq_worker.register_birth()
    result = run_script("healthcheck", ["worker"], env)
    assert result.returncode == 0, result.stdout + result.stderr


# --- GPU claims -------------------------------------------------------------------------


def gpus(text: str = TWO_GPUS):
    return gpu_claim.parse_nvidia_smi(text)


def claims_for(redis_url: str, owner: str, ttl_s: int = 30):
    return gpu_claim.Claims(redis.Redis.from_url(redis_url), "deploytest", owner, ttl_s)


def test_parse_nvidia_smi_and_index_lists():
    assert gpus() == [gpu_claim.Gpu(0, "GPU-aaaa-0000"), gpu_claim.Gpu(1, "GPU-bbbb-1111")]
    assert gpu_claim.parse_nvidia_smi("\n") == []
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        gpu_claim.parse_nvidia_smi("No devices were found")
    assert gpu_claim.parse_indices("") is None and gpu_claim.parse_indices("all") is None
    assert gpu_claim.parse_indices("2, 0") == {0, 2}
    with pytest.raises(ValueError, match="comma-separated integers"):
        gpu_claim.parse_indices("first")
    assert gpu_claim.candidates(gpus(), {1}) == [gpu_claim.Gpu(1, "GPU-bbbb-1111")]
    with pytest.raises(ValueError, match=r"\[5\] are not visible"):
        gpu_claim.candidates(gpus(), {0, 5})


def test_each_owner_gets_a_different_gpu_until_none_is_left(redis_url):
    a, b, c = (claims_for(redis_url, owner) for owner in ("worker-a", "worker-b", "worker-c"))
    got_a = a.try_claim(gpus(), 1)
    got_b = b.try_claim(gpus(), 1)
    assert got_a and got_b and {got_a[0].index, got_b[0].index} == {0, 1}
    assert c.try_claim(gpus(), 1) is None
    assert a.holder(got_a[0]) == "worker-a"
    ttl = a.conn.ttl(gpu_claim.claim_key("deploytest", got_a[0]))
    assert 0 < ttl <= 30, "a claim must expire if its worker vanishes"


def test_a_restarted_owner_gets_its_own_gpu_back(redis_url):
    first = claims_for(redis_url, "worker-a").try_claim(gpus(), 1)
    claims_for(redis_url, "worker-b").try_claim(gpus(), 1)
    again = claims_for(redis_url, "worker-a").try_claim(gpus(), 1)
    assert again == first


def test_multi_gpu_claims_are_all_or_nothing(redis_url):
    a, b = claims_for(redis_url, "worker-a"), claims_for(redis_url, "worker-b")
    assert [g.index for g in a.try_claim(gpus(THREE_GPUS), 1)] == [0]
    assert b.try_claim(gpus(THREE_GPUS), 3) is None
    assert [b.holder(g) for g in gpus(THREE_GPUS)] == ["worker-a", None, None], "partial claims must be released"
    assert [g.index for g in b.try_claim(gpus(THREE_GPUS), 2)] == [1, 2]


def test_release_and_expiry_free_the_gpu(redis_url):
    a, b = claims_for(redis_url, "worker-a"), claims_for(redis_url, "worker-b")
    only = gpus("0, GPU-solo\n")
    assert a.try_claim(only, 1)
    b.release(only)  # not b's claim: nothing happens
    assert b.try_claim(only, 1) is None
    a.release(only)
    assert b.try_claim(only, 1) == only
    a.conn.delete(gpu_claim.claim_key("deploytest", only[0]))  # what expiry does
    assert b.refresh(only), "refresh re-creates an expired claim of ours"
    assert a.try_claim(only, 1) is None


def test_claim_with_wait_retries_until_a_gpu_frees_up(redis_url):
    a, b = claims_for(redis_url, "worker-a"), claims_for(redis_url, "worker-b")
    only = gpus("0, GPU-solo\n")
    a.try_claim(only, 1)
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 3:
            a.release(only)  # the old container's claim goes away

    now = [0.0]
    got = gpu_claim.claim_with_wait(b, only, 1, wait_s=60, poll_s=2, sleep=sleep, clock=lambda: now[0])
    assert got == only and len(polls) == 3


def test_claim_with_wait_gives_up_with_the_holders(redis_url):
    a, b = claims_for(redis_url, "worker-a"), claims_for(redis_url, "worker-b")
    only = gpus("0, GPU-solo\n")
    a.try_claim(only, 1)
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(gpu_claim.NoFreeGpu, match="worker-a"):
        gpu_claim.claim_with_wait(b, only, 1, wait_s=10, poll_s=2, sleep=sleep, clock=lambda: now[0])
    assert now[0] >= 10
    with pytest.raises(gpu_claim.NoFreeGpu, match="only 1 candidate"):
        gpu_claim.claim_with_wait(b, only, 2, wait_s=10)
    with pytest.raises(ValueError, match="at least 1"):
        gpu_claim.claim_with_wait(b, only, 0, wait_s=10)


def test_hold_refreshes_until_stopped_then_releases(redis_url):
    claims = claims_for(redis_url, "worker-a", ttl_s=30)
    held = claims.try_claim(gpus(), 1)
    key = gpu_claim.claim_key("deploytest", held[0])
    seen = []  # holder after each tick

    def sleep(seconds):
        if len(seen) == 1:
            claims.conn.delete(key)  # the claim is lost (e.g. Redis restarted without it)
        seen.append(claims.holder(held[0]))

    now = [0.0]

    def clock():
        now[0] += 5  # every call moves time on; a refresh is due every ttl/3 = 10 s
        return now[0]

    gpu_claim.hold(claims, held, stop=lambda: len(seen) >= 6, sleep=sleep, clock=clock)
    assert seen[:3] == ["worker-a", None, "worker-a"], "the next refresh re-creates a lost claim"
    assert claims.holder(held[0]) is None, "hold releases its claims when it stops"


def test_claim_cli_prints_indices_and_fails_clearly_when_all_are_taken(redis_url):
    env = script_env(redis_url)
    common = ["--gpus", TWO_GPUS]
    first = run_script("gpu_claim", [*common, "--owner", "w1", "claim"], env)
    second = run_script("gpu_claim", [*common, "--owner", "w2", "claim"], env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert {first.stdout.strip(), second.stdout.strip()} == {"0", "1"}
    third = run_script("gpu_claim", [*common, "--owner", "w3", "claim", "--wait", "0"], env)
    assert third.returncode == 3 and "no 1 free GPU" in third.stderr and "w1" in third.stderr
    pinned = run_script("gpu_claim", [*common, "--owner", "w1", "claim", "--only", "1", "--wait", "0"], env)
    assert pinned.returncode == 3, "GPU 1 belongs to w2"
    bad = run_script("gpu_claim", [*common, "--owner", "w4", "claim", "--only", "7"], env)
    assert bad.returncode == 3 and "not visible" in bad.stderr


def test_claim_cli_without_gpus_claims_nothing(redis_url):
    result = run_script("gpu_claim", ["--gpus", "", "claim"], script_env(redis_url))
    assert result.returncode == 0 and result.stdout == "" and "no NVIDIA GPU" in result.stderr


# --- entrypoint.sh ----------------------------------------------------------------------


@pytest.fixture()
def fake_bin(tmp_path):
    """PATH with python3 (this venv), an nvidia-smi that lists two GPUs and an egm-assist that reports."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"  # a wrapper, not a symlink: a symlink would lose the venv
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{TWO_GPUS.replace(chr(10), chr(92) + 'n')}'\n")
    report = tmp_path / "report.json"
    cli = bin_dir / "egm-assist"
    cli.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   f"json.dump({{'argv': sys.argv[1:], 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
                   f"'pid': os.getpid()}}, open({str(report)!r}, 'w'))\n")
    for script in (python, smi, cli):
        script.chmod(0o755)
    return bin_dir, report


def run_entrypoint(fake_bin, redis_url: str, args: list[str], **env_extra: str) -> dict:
    bin_dir, report = fake_bin
    env = script_env(redis_url, **env_extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run([str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())


def claim_holders(redis_url: str) -> dict[int, str | None]:
    claims = claims_for(redis_url, "observer")
    return {g.index: claims.holder(g) for g in gpus()}


def test_entrypoint_claims_a_gpu_for_the_worker_and_frees_it_when_the_worker_exits(fake_bin, redis_url):
    claims_for(redis_url, "someone-else").try_claim(gpus("0, GPU-aaaa-0000\n"), 1)
    report = run_entrypoint(fake_bin, redis_url, ["worker", "--burst"])
    assert report["argv"] == ["worker", "--burst"]
    assert report["cuda"] == "1", "GPU 0 is taken, so this worker must get GPU 1"
    # the background `hold` notices its worker is gone and releases the claim
    assert wait_until(lambda: claim_holders(redis_url)[1] is None), claim_holders(redis_url)
    assert claim_holders(redis_url)[0] == "someone-else"


def test_entrypoint_respects_a_hand_pinned_gpu_and_other_subcommands(fake_bin, redis_url):
    report = run_entrypoint(fake_bin, redis_url, ["worker"], CUDA_VISIBLE_DEVICES="1")
    assert report["cuda"] == "1"
    assert claim_holders(redis_url) == {0: None, 1: None}, "a hand-pinned worker claims nothing"
    report = run_entrypoint(fake_bin, redis_url, ["status"])
    assert report["argv"] == ["status"] and report["cuda"] is None
    assert claim_holders(redis_url) == {0: None, 1: None}


def test_entrypoint_claims_as_many_gpus_as_tensor_parallel_needs(fake_bin, redis_url):
    report = run_entrypoint(fake_bin, redis_url, ["worker"], EGM_VLLM_TENSOR_PARALLEL_SIZE="2")
    assert report["cuda"] == "0,1"
    assert wait_until(lambda: claim_holders(redis_url) == {0: None, 1: None})
    report = run_entrypoint(fake_bin, redis_url, ["worker"], WORKER_GPU_IDS="1")
    assert wait_until(lambda: claim_holders(redis_url) == {0: None, 1: None})
    assert report["cuda"] == "1"
