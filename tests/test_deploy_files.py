"""Static checks of the deployment files: docker-compose.yml, the Dockerfiles,
config/env.example, .dockerignore and docs/deployment.md.

Docker cannot run on the development machine, so these tests read the files
and check them against the code they deploy: every variable handed to the
backend/worker is a real setting (egm.config.settings) or a documented compose-only
variable, env.example lists every setting at its true default, COPY sources
exist and survive .dockerignore, images are pinned, containers run as non-root
with a HEALTHCHECK and start an egm-assist subcommand that exists.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from egm.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
NO_GPU_OVERRIDE = ROOT / "docker" / "compose.no-gpu.yml"
ENV_EXAMPLE = ROOT / "config" / "env.example"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
DOCKERFILES = {
    "backend": ROOT / "docker" / "Dockerfile.backend",
    "worker": ROOT / "docker" / "Dockerfile.worker",
    "dashboard": ROOT / "docker" / "Dockerfile.dashboard",
}
EGM_IMAGES = ("backend", "worker")

#: Variables only docker-compose.yml reads (or passes to docker/entrypoint.sh); documented in
#: docs/deployment.md and listed in config/env.example, never read by egm.config.settings.
COMPOSE_ONLY_VARS = {
    "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN",
    "LABEL_STUDIO_PORT", "BACKEND_PORT", "REDIS_PORT", "RQ_DASHBOARD_PORT",
    "LOCAL_FILES_DIR", "WORKER_GPU_IDS", "WORKER_GPUS_PER_REPLICA",
}
SERVICES = {"redis", "label-studio", "backend", "worker", "rq-dashboard"}
SECRET_NAME = re.compile(r"(PASSWORD|PASS|TOKEN|SECRET|API_KEY)$")
PLACEHOLDER = re.compile(r"^(|change-me.*)$")


# --- readers -------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus the compose merge tags `!reset` and `!override` (used by override files)."""


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__compose_tag__": tag_suffix, "value": value}


_ComposeLoader.add_multi_constructor("!", _tagged)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def settings_aliases() -> dict[str, str]:
    """Every environment name egm.config.settings reads -> field name."""
    out = {}
    for name, field in Settings.model_fields.items():
        for alias in field.validation_alias.choices:
            out[alias] = name
    return out


def primary_aliases() -> dict[str, str]:
    """The documented (first) environment name of each field -> field name."""
    return {field.validation_alias.choices[0]: name for name, field in Settings.model_fields.items()}


@dataclass(frozen=True)
class EnvLine:
    name: str
    value: str
    active: bool  # False for "# NAME=default" documentation lines
    lineno: int


_ENV_LINE = re.compile(r"^(?P<hash>#\s?)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def read_env_example() -> list[EnvLine]:
    lines = []
    for lineno, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        m = _ENV_LINE.match(raw.strip())
        if m:
            lines.append(EnvLine(m["name"], m["value"], m["hash"] is None, lineno))
    return lines


def env_example_defaults() -> dict[str, str]:
    return {line.name: line.value for line in read_env_example()}


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\}|\$\{[^{}]*\})*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; nested defaults included."""

    def repl(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (None, ""):
            return current or ""
        missing = current is None or (op.startswith(":") and current == "")
        if op.endswith("-"):
            return interpolate(arg, env) if missing else current
        if missing:
            raise KeyError(f"{name}: {arg}")
        return current

    previous = None
    while previous != value:
        previous, value = value, _VAR.sub(repl, value)
    return value


def referenced_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def env_dict(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Port:
    host_ip: str | None
    host: int
    container: int


def parse_port(spec: str, env: dict[str, str]) -> Port:
    parts = interpolate(spec, env).split(":")
    if len(parts) == 3:
        return Port(parts[0], int(parts[1]), int(parts[2]))
    if len(parts) == 2:
        return Port(None, int(parts[0]), int(parts[1]))
    raise AssertionError(f"port spec {spec!r}: publish ports as [ip:]host:container")


def ports_of(compose: dict, service: str) -> list[Port]:
    return [parse_port(str(spec), env_example_defaults()) for spec in compose["services"][service].get("ports", [])]


def egm_subcommands() -> set[str]:
    try:
        from egm.cli.main import build_parser
    except ImportError:  # TODO: drop once egm.cli is always present
        return {"serve", "worker", "status", "prelabel", "export", "next", "demo", "parse"}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("egm.cli.build_parser() has no subcommands")


# --- Dockerfile parsing ----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    """JSON exec form -> list; shell form -> shell words."""
    args = args.strip()
    if args.startswith("["):
        return yaml.safe_load(args)
    return shlex.split(args)


def copy_sources(ins: Instruction) -> list[str]:
    words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
    if any(w.startswith("--from=") for w in shlex.split(ins.args)):
        return []
    return words[:-1]


def base_images(instructions: list[Instruction]) -> list[str]:
    """FROM images with ARG defaults substituted; internal stage names left out."""
    args, stages, images = {}, set(), []
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip('"')
        if ins.keyword == "FROM":
            words = ins.args.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            if image not in stages:
                images.append(image)
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
    return images


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def last(instructions: list[Instruction], keyword: str) -> Instruction | None:
    found = [ins for ins in instructions if ins.keyword == keyword]
    return found[-1] if found else None


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parent folders; last match wins."""
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        globs = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        hit = any(fnmatch.fnmatchcase(prefix, g) or fnmatch.fnmatchcase(prefix, g.replace("**/", "*/"))
                  for prefix in prefixes for g in globs)
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)
        if hit:
            ignored = not negate
    return ignored


# --- compose: services, ports, volumes -----------------------------------------------


def test_every_service_is_defined_and_only_the_dashboard_is_optional(compose):
    services = compose["services"]
    assert SERVICES <= set(services), f"missing services: {SERVICES - set(services)}"
    assert "dashboard" in services["rq-dashboard"].get("profiles", [])
    for name in SERVICES - {"rq-dashboard"}:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"


def test_published_ports_match_env_example_and_private_services_bind_loopback(compose):
    defaults = env_example_defaults()
    expected = {  # service -> (host port variable, container port, loopback only)
        "label-studio": ("LABEL_STUDIO_PORT", 8080, False),
        "backend": ("BACKEND_PORT", 9090, True),
        "redis": ("REDIS_PORT", 6379, True),
        "rq-dashboard": ("RQ_DASHBOARD_PORT", 9181, True),
    }
    for service, (var, container_port, loopback) in expected.items():
        ports = ports_of(compose, service)
        assert [p.container for p in ports] == [container_port], f"{service}: {ports}"
        assert ports[0].host == int(defaults[var]), f"{service}: host port differs from env.example {var}"
        compose_default = parse_port(str(compose["services"][service]["ports"][0]), {})
        assert compose_default.host == int(defaults[var]), f"{service}: compose default for {var} != env.example"
        if loopback:
            assert ports[0].host_ip == "127.0.0.1", f"{service} has no auth of its own: publish on 127.0.0.1"
    assert not compose["services"]["worker"].get("ports"), "workers take work from Redis, not from a port"


def test_named_volumes_are_declared_and_state_is_persisted(compose):
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            source, target = str(spec).split(":")[:2]
            mounts.setdefault(name, {})[target] = source
            if not source.startswith(("/", ".", "$", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared under top-level volumes"
    assert mounts["redis"]["/data"] in declared
    assert mounts["label-studio"]["/label-studio/data"] in declared
    assert mounts["worker"]["/models"] in declared, "model cache must be a volume, not part of the image"
    backend_models = [str(v) for v in compose["services"]["backend"]["volumes"] if ":/models" in str(v)]
    assert backend_models == [], "the workers own model_version (egm.fleet); the backend must not compute one"


def test_redis_persists_with_appendonly_and_has_a_healthcheck(compose):
    redis_svc = compose["services"]["redis"]
    command = redis_svc["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--maxmemory-policy") + 1] == "noeviction", "evicting keys would drop queued jobs"
    assert "redis-cli" in redis_svc["healthcheck"]["test"]


def test_worker_reserves_nvidia_gpus(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # `count: all` + the claim in docker/entrypoint.sh: a numeric count would pin every replica to GPU 0.
    assert device["count"] == "all"
    assert compose["services"]["worker"].get("init") is True, "tini forwards SIGTERM for a warm RQ shutdown"


def test_backend_and_worker_wait_for_a_healthy_redis(compose):
    for name in ("backend", "worker", "rq-dashboard"):
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_label_studio_is_pinned_and_can_reach_a_backend_on_the_compose_network(compose):
    ls = compose["services"]["label-studio"]
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", ls["image"])
    env = env_dict(ls)
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LOCAL_FILES_SERVING_ENABLED"] == "true"
    for var in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert referenced_vars(env[var]) == {var}, f"{var} must come from .env"
    assert "healthcheck" in ls


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image!r} to a version tag"


# --- compose: environment ----------------------------------------------------------


def egm_services(compose: dict) -> dict[str, dict]:
    services = {name: compose["services"][name] for name in ("backend", "worker")}
    override = load_yaml(NO_GPU_OVERRIDE)["services"]["worker"]
    services["worker (compose.no-gpu.yml)"] = override
    return services


def test_env_passed_to_backend_and_worker_are_settings_or_compose_only(compose):
    known = set(settings_aliases()) | COMPOSE_ONLY_VARS
    for name, service in egm_services(compose).items():
        unknown = set(env_dict(service)) - known
        assert not unknown, f"{name} passes {sorted(unknown)}: not a egm.config.settings alias nor compose-only"


def test_backend_and_worker_read_the_one_env_file(compose):
    for name in ("backend", "worker"):
        env_files = compose["services"][name]["env_file"]
        assert [entry["path"] for entry in env_files] == [".env"], name
        assert all(entry.get("required") is False for entry in env_files)


def test_in_network_addresses_point_at_the_right_services(compose):
    env = env_example_defaults()
    ls_port = ports_of(compose, "label-studio")[0].container
    backend_port = ports_of(compose, "backend")[0].container
    for name in ("backend", "worker"):
        service_env = {k: interpolate(v, env) for k, v in env_dict(compose["services"][name]).items()}
        assert service_env["REDIS_URL"].startswith("redis://redis:6379/"), name
        assert service_env["LABEL_STUDIO_URL"] == f"http://label-studio:{ls_port}", name
        assert service_env["LABEL_STUDIO_API_KEY"] == env["LABEL_STUDIO_USER_TOKEN"], name
        ls_root = env_dict(compose["services"]["label-studio"])["LOCAL_FILES_DOCUMENT_ROOT"]
        assert service_env["EGM_LOCAL_FILES_ROOT"] == ls_root, "workers must see local files where Label Studio does"
    backend_env = env_dict(compose["services"]["backend"])
    public = urlsplit(backend_env["EGM_PUBLIC_URL"])
    assert public.port == backend_port, "the URL Label Studio connects to"
    # Label Studio refuses webhook URLs whose host has no dot: the backend's dotted alias on the network
    assert "." in public.hostname, "Label Studio refuses webhook hosts without a dot"
    assert public.hostname in compose["services"]["backend"]["networks"]["default"]["aliases"]
    assert int(backend_env["EGM_PORT"]) == backend_port
    assert backend_env["EGM_HOST"] == "0.0.0.0"
    dashboard_url = env_dict(compose["services"]["rq-dashboard"])["RQ_DASHBOARD_REDIS_URL"]
    assert dashboard_url.startswith("redis://redis:6379/")


def test_every_compose_variable_is_in_env_example_and_has_a_default_or_a_message():
    known = {line.name for line in read_env_example()}
    for path in (COMPOSE, NO_GPU_OVERRIDE):
        text = path.read_text()
        missing = referenced_vars(text) - known
        assert not missing, f"{path.name} uses {sorted(missing)}, which config/env.example does not list"
        for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|[:?-])", text):
            assert m.group(2) != "}", f"{path.name}: ${{{m.group(1)}}} needs a :-default or a :?message"


def test_missing_secrets_stop_compose_with_a_clear_message(compose):
    ls_env = env_dict(compose["services"]["label-studio"])
    with pytest.raises(KeyError, match="env.example"):
        interpolate(ls_env["LABEL_STUDIO_USERNAME"], {})
    backend_env = env_dict(compose["services"]["backend"])
    with pytest.raises(KeyError, match="LABEL_STUDIO_USER_TOKEN"):
        interpolate(backend_env["LABEL_STUDIO_API_KEY"], {})
    # an explicit LABEL_STUDIO_API_KEY (e.g. a personal access token) wins over the admin token
    assert interpolate(backend_env["LABEL_STUDIO_API_KEY"], {"LABEL_STUDIO_API_KEY": "pat"}) == "pat"


def test_compose_commands_are_existing_subcommands(compose):
    commands = egm_subcommands()
    for name in ("backend", "worker"):
        command = compose["services"][name]["command"]
        assert command[0] in commands, f"{name}: `egm-assist {command[0]}` does not exist"


def test_no_gpu_override_drops_the_gpu_and_uses_the_light_image():
    worker = load_yaml(NO_GPU_OVERRIDE)["services"]["worker"]
    assert worker["deploy"]["__compose_tag__"] == "reset"
    assert worker["build"]["__compose_tag__"] == "override"
    assert worker["build"]["value"]["dockerfile"] == "docker/Dockerfile.backend"
    assert (ROOT / worker["build"]["value"]["dockerfile"]).is_file()
    assert interpolate(env_dict(worker)["EGM_ENGINE"], {}) == "scripted"
    assert "worker" in worker["healthcheck"]["test"]


# --- env.example ------------------------------------------------------------------------


def test_env_example_lists_every_setting_and_nothing_unknown():
    names = [line.name for line in read_env_example()]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"listed twice in env.example: {sorted(duplicates)}"
    missing = set(primary_aliases()) - set(names)
    assert not missing, f"add to config/env.example (as '# NAME=default' with a comment): {sorted(missing)}"
    unknown = set(names) - set(primary_aliases()) - COMPOSE_ONLY_VARS
    assert not unknown, f"config/env.example lists {sorted(unknown)}: neither a setting nor compose-only"
    assert COMPOSE_ONLY_VARS <= set(names)


def test_env_example_documents_each_variable_with_a_comment():
    lines = ENV_EXAMPLE.read_text().splitlines()
    for entry in read_env_example():
        above = lines[entry.lineno - 2].strip()
        is_description = above.startswith("# ") and _ENV_LINE.match(above[2:]) is None
        assert is_description, f"env.example line {entry.lineno}: put a one-line comment above {entry.name}"


def test_env_example_shows_the_true_defaults():
    fields = Settings.model_fields
    for entry in read_env_example():
        if entry.name not in primary_aliases():
            continue
        field_name = primary_aliases()[entry.name]
        default = fields[field_name].default
        if entry.active:
            Settings(**{field_name: entry.value})  # an active override must at least validate
            continue
        if default is None:
            assert entry.value == "", f"{entry.name}: default is unset, show it as '# {entry.name}='"
            continue
        shown = getattr(Settings.model_validate({entry.name: entry.value}), field_name)
        assert shown == default, f"{entry.name}: env.example shows {entry.value!r}, settings default is {default!r}"


def test_env_example_active_lines_hold_only_placeholders_for_secrets():
    for entry in read_env_example():
        if SECRET_NAME.search(entry.name):
            assert PLACEHOLDER.match(entry.value), f"{entry.name}: use an empty value or a change-me placeholder"
        if entry.name == "LABEL_STUDIO_USER_TOKEN":
            assert len(entry.value) <= 40, "Label Studio tokens are at most 40 characters"


def test_env_example_is_a_complete_env_for_compose(compose):
    """With env.example copied to .env, every ${...} in the compose files resolves."""
    env = {line.name: line.value for line in read_env_example() if line.active}
    for path in (COMPOSE, NO_GPU_OVERRIDE):
        for m in _VAR.finditer(path.read_text()):
            interpolate(m.group(0), env)  # raises KeyError for a required variable left out


# --- Dockerfiles --------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_base_images_are_pinned(image):
    bases = base_images(read_dockerfile(DOCKERFILES[image]))
    assert bases
    for base in bases:
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in base, f"{image}: pin the base image ({base!r})"


def test_backend_is_python_312_slim_and_worker_is_the_vllm_image():
    backend = base_images(read_dockerfile(DOCKERFILES["backend"]))
    assert all(b.startswith("python:3.12") and "slim" in b for b in backend)
    worker = base_images(read_dockerfile(DOCKERFILES["worker"]))
    assert len(worker) == 1 and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", worker[0])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_are_not_dockerignored(image):
    patterns = dockerignore_patterns()
    for ins in read_dockerfile(DOCKERFILES[image]):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        assert ins.keyword == "COPY", f"{image}: use COPY, not ADD"
        for source in copy_sources(ins):
            path = ROOT / source
            assert path.exists(), f"{image}: COPY source {source!r} does not exist"
            assert not dockerignored(source, patterns), f"{image}: {source!r} is excluded by .dockerignore"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_with_a_healthcheck(image):
    final = final_stage(read_dockerfile(DOCKERFILES[image]))
    user = last(final, "USER")
    assert user is not None, f"{image}: no USER (would run as root)"
    assert user.args.split(":")[0] not in ("root", "0"), f"{image}: USER {user.args}"
    health = last(final, "HEALTHCHECK")
    assert health is not None and health.args.upper() != "NONE", f"{image}: no HEALTHCHECK"


def test_images_sharing_the_model_volume_agree_on_owner_and_layout():
    """Docker seeds an empty named volume from the first container that mounts it: both must seed it alike."""
    for image in EGM_IMAGES:
        runs = " ".join(ins.args for ins in read_dockerfile(DOCKERFILES[image]) if ins.keyword == "RUN")
        assert "useradd --uid 10001" in runs, f"{image}: the egm user must be uid 10001 in every image"
        assert "mkdir -p /models/hf /models/vllm-cache" in runs and "chown -R egm:egm /models" in runs, image


@pytest.mark.parametrize("image", EGM_IMAGES)
def test_healthcheck_script_is_in_the_image(image):
    final = final_stage(read_dockerfile(DOCKERFILES[image]))
    health = last(final, "HEALTHCHECK")
    cmd = exec_form(health.args.split("CMD", 1)[1])
    script = cmd[1]
    copied = [ins for ins in final if ins.keyword == "COPY" and script.rsplit("/", 1)[-1] in ins.args]
    assert copied, f"{image}: HEALTHCHECK runs {script}, which no COPY puts there"
    assert cmd[2] == {"backend": "backend", "worker": "worker"}[image]


@pytest.mark.parametrize("image", EGM_IMAGES)
def test_dockerfile_starts_an_existing_egm_assist_subcommand(image):
    final = final_stage(read_dockerfile(DOCKERFILES[image]))
    entrypoint = exec_form(last(final, "ENTRYPOINT").args)
    cmd = exec_form(last(final, "CMD").args)
    if entrypoint[0].endswith("entrypoint.sh"):
        script = (ROOT / "docker" / "entrypoint.sh").read_text()
        assert re.search(r'^exec egm-assist "\$@"$', script, re.M), "entrypoint.sh must exec egm-assist \"$@\""
    else:
        assert entrypoint == ["egm-assist"], f"{image}: ENTRYPOINT {entrypoint}"
    assert cmd[0] in egm_subcommands(), f"{image}: CMD {cmd}"
    assert cmd[0] == {"backend": "serve", "worker": "worker"}[image]


def test_backend_image_listens_on_all_interfaces_on_the_exposed_port():
    final = final_stage(read_dockerfile(DOCKERFILES["backend"]))
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    assert "EGM_HOST=0.0.0.0" in env
    exposed = last(final, "EXPOSE").args.split()
    assert exposed == ["9090"] and "EGM_PORT=9090" in env


def test_backend_image_has_no_gpu_stack_and_worker_adds_the_hf_extra():
    backend_runs = " ".join(ins.args for ins in read_dockerfile(DOCKERFILES["backend"]) if ins.keyword == "RUN")
    assert "[hf]" not in backend_runs and "torch" not in backend_runs
    worker_runs = " ".join(ins.args for ins in read_dockerfile(DOCKERFILES["worker"]) if ins.keyword == "RUN")
    assert '".[hf]"' in worker_runs and "--constraint" in worker_runs


def test_worker_image_keeps_weights_out_and_caches_on_the_models_volume():
    final = final_stage(read_dockerfile(DOCKERFILES["worker"]))
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    assert "HF_HOME=/models/" in env
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env, "GPU claim indices follow nvidia-smi (PCI) order"
    assert not any(ins.keyword == "RUN" and re.search(r"huggingface-cli|snapshot_download|hf download", ins.args)
                   for ins in final), "weights are downloaded at run time into /models, never baked in"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_bakes_no_secrets(image):
    for ins in read_dockerfile(DOCKERFILES[image]):
        if ins.keyword not in ("ENV", "ARG"):
            continue
        for word in shlex.split(ins.args):
            name, sep, value = word.partition("=")
            if sep and SECRET_NAME.search(name.upper()):
                assert not value, f"{image}: {ins.keyword} {name} bakes a secret into the image"
    text = DOCKERFILES[image].read_text()
    assert not re.search(r"(PASSWORD|TOKEN|API_KEY|SECRET)\s*=\s*\S", text), f"{image}: secret-looking assignment"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_builds_with_no_registry_but_its_base(image):
    """A `# syntax=` line makes BuildKit fetch a frontend image from Docker Hub; `COPY --chmod` and
    other BuildKit-only flags fail under the classic builder. Neither may appear (issue 14)."""
    text = DOCKERFILES[image].read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), f"{image}: no `# syntax=` line"
    for ins in read_dockerfile(DOCKERFILES[image]):
        if ins.keyword in ("COPY", "ADD", "RUN"):
            assert not re.search(r"--(chmod|link|mount|parents|exclude|checksum)\b", ins.args), \
                f"{image}: {ins.keyword} {ins.args[:60]} needs BuildKit"


def test_images_copy_the_readme_pyproject_names():
    """pyproject's `readme` must be in the build context, or building the wheel warns and drops it."""
    for image in EGM_IMAGES:
        copies = " ".join(ins.args for ins in read_dockerfile(DOCKERFILES[image]) if ins.keyword == "COPY")
        assert "README.md" in copies.split(), f"{image}: COPY README.md next to pyproject.toml"


def test_entrypoint_script_is_valid_executable_shell():
    script = ROOT / "docker" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    assert script.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(script)], check=True)


# --- .dockerignore ----------------------------------------------------------------------


def test_dockerignore_keeps_build_inputs_and_drops_secrets_and_bulk():
    patterns = dockerignore_patterns()
    for rel in (".env", ".venv/bin/python", ".git/HEAD", "tests/test_x.py", "models/x.safetensors",
                "egm/__pycache__/x.pyc"):
        assert dockerignored(rel, patterns), f"{rel} must not reach the build context"
    packaged = [p for top in ("egm", "backend", "worker", "config") for p in (ROOT / top).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts]
    assert packaged
    for path in packaged + [ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "docker" / "entrypoint.sh"]:
        rel = path.relative_to(ROOT).as_posix()
        assert not dockerignored(rel, patterns), f"{rel} is needed by the images but .dockerignore drops it"


# --- docs ----------------------------------------------------------------------------------


def test_deployment_doc_covers_the_path_from_clone_to_running_stack():
    doc = DEPLOYMENT_DOC.read_text()
    for needle in ("cp config/env.example .env", "docker compose up -d", "http://backend.egm.internal:9090",
                   "--scale worker=", "PATCH /api/webhooks/", "model_version", "/models"):
        assert needle in doc, f"docs/deployment.md should mention {needle!r}"


def test_compose_only_variables_are_documented():
    doc = DEPLOYMENT_DOC.read_text()
    undocumented = sorted(v for v in COMPOSE_ONLY_VARS if f"`{v}`" not in doc)
    assert not undocumented, f"document in docs/deployment.md: {undocumented}"


# --- packaging --------------------------------------------------------------------------------


def test_every_code_package_is_in_the_wheel():
    """The images install the wheel, not the checkout: a package missing from pyproject's list is
    missing there (egm.labelstudio was, and the backend container died at import)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            package = ".".join((name, *rel))
            assert package in listed, f"add {package!r} to [tool.setuptools] packages in pyproject.toml"
