"""The cluster configs in cluster/ are what `ray up` and the KubeRay operator accept, and say what the project needs.

Ray configs (every YAML in cluster/ with a ``provider``): each goes through the steps `ray up` runs on it
before it touches a machine, Ray's own ``prepare_config`` (provider defaults merged in, setup commands
merged, per-type worker counts filled) and ``validate_config`` (Ray's ray-schema.json, then its own
cross-checks), from ``ray.autoscaler._private.util``, as ``ray.autoscaler._private.commands._bootstrap_config``
calls them. Two steps of `ray up` sit between and after those and are not run here, honestly so:
``fillout_available_node_types_resources`` and ``bootstrap_config`` of the provider class. For AWS and GCP
they import boto3 / googleapiclient and call the cloud (instance-type lookups, IAM roles, subnets, firewall
rules) with credentials, so they cannot run without network and an account; they fill in what the cloud
says and check nothing of ours. The provider *defaults* that ``prepare_config`` merges in are plain YAML
files shipped inside Ray (ray/autoscaler/{aws,gcp,local}/defaults.yaml) and need no cloud library.

Then the project's own facts: which node type advertises ``engram_memory`` and which ``engram_compute``
(never both), that the setup commands install this project (with the cloud extra on the head that runs the
autoscaler), that the head starts the memory service with TLS, a client CA and a data root on storage every
node mounts, and that Ray's token auth is on.

KubeRay manifests: validated with jsonschema against the RayCluster / RayJob CRD schemas vendored in
cluster/kuberay/schemas (KubeRay v1.7.0), made strict the way the API server is with
``kubectl apply --validate=strict``: an unknown field is an error, not silently pruned. Broken copies
(a misspelt field, a wrong type, a malformed quantity) must fail, so the check is known to bite.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = KUBERAY / "schemas"

RAY_CONFIG_NAMES = ("aws.yaml", "gcp.yaml", "local.yaml")
MEMORY_RESOURCE = "engram_memory"
COMPUTE_RESOURCE = "engram_compute"
CLOUD_EXTRA = {"aws": "aws", "gcp": "gcp"}  # provider type -> the pyproject extra `ray up` needs on the head
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca")


def _load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_configs() -> dict[str, dict]:
    return {path.name: _load(path) for path in sorted(CLUSTER.glob("*.yaml")) if "provider" in (_load(path) or {})}


def _prepare_and_validate(config: dict) -> dict:
    """What `ray up` does to a config before it starts anything that needs a cloud (see the module docstring)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _commands_running(commands: list[str], program: str) -> list[list[str]]:
    """The argument lists of every invocation of ``program`` (e.g. "engram memory up") in shell commands."""
    words = program.split()
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for start in range(len(tokens) - len(words) + 1):
            if tokens[start:start + len(words)] == words:
                args = []
                for token in tokens[start + len(words):]:
                    if token and set(token) <= set(";&|<>()"):  # the command ends at an operator
                        break
                    args.append(token)
                found.append(args)
    return found


def _flags(args: list[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of an argument list."""
    values = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            values[name] = value if eq else (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--")
                                             else "")
    return values


def _parse_engram(subcommand: list[str], args: list[str]):
    """Parse with the project's own CLI parser: a misspelt or unknown flag fails here."""
    from compute.cli import build_parser

    parsed, unknown = build_parser().parse_known_args([*subcommand, *args])
    assert unknown == [], f"`engram {' '.join(subcommand)}` does not know {unknown}"
    return parsed


# ---- Ray configs -------------------------------------------------------------------------------------------


def test_the_ray_configs_are_the_three_expected():
    assert sorted(_ray_configs()) == sorted(RAY_CONFIG_NAMES)
    assert not (CLUSTER / "memory-cluster.yaml").exists(), "renamed to cluster/aws.yaml"
    assert (CLUSTER / "tables.yaml").exists()


@pytest.mark.parametrize("name", RAY_CONFIG_NAMES)
def test_ray_up_prepares_and_validates(name):
    prepared = _prepare_and_validate(_load(CLUSTER / name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", RAY_CONFIG_NAMES)
def test_ray_validation_rejects_broken_copies(name):
    """The check above can fail: Ray's schema refuses a misspelt top-level key and a non-numeric resource."""
    config = _load(CLUSTER / name)
    misspelt = copy.deepcopy(config)
    misspelt["setup_comands"] = misspelt.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        _prepare_and_validate(misspelt)

    prepared = _prepare_and_validate(config)
    worker_type = next(t for t in prepared["available_node_types"] if t != prepared["head_node_type"]) \
        if len(prepared["available_node_types"]) > 1 else prepared["head_node_type"]
    prepared["available_node_types"][worker_type]["resources"] = {MEMORY_RESOURCE: "two"}
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepared)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_node_types_advertise_their_role(name):
    prepared = _prepare_and_validate(_load(CLUSTER / name))
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    memory = [t for t, spec in types.items() if spec["resources"].get(MEMORY_RESOURCE, 0) >= 1]
    compute = [t for t, spec in types.items() if spec["resources"].get(COMPUTE_RESOURCE, 0) >= 1]
    assert len(memory) == 1 and len(compute) == 1, (memory, compute)
    assert head not in memory + compute, "the head holds no shards and runs no trainers"
    assert MEMORY_RESOURCE not in types[compute[0]]["resources"], "GPU nodes must never take shards"
    assert COMPUTE_RESOURCE not in types[memory[0]]["resources"]
    assert types[memory[0]]["min_workers"] >= 1, "the service's shards need memory nodes from the start"
    if "GPU" in types[compute[0]]["resources"]:  # one training worker a GPU
        assert types[compute[0]]["resources"][COMPUTE_RESOURCE] == types[compute[0]]["resources"]["GPU"]


def _local_roles(config: dict) -> tuple[list[str], list[str], list[str]]:
    """(memory hosts, compute hosts, node-resources.sh arguments) from the local config's worker start."""
    calls = _commands_running(config["worker_start_ray_commands"], "bash ~/engram/cluster/local/node-resources.sh")
    assert len(calls) == 1, "every local worker must learn its role from node-resources.sh"
    args = calls[0]
    lists = dict(arg.split("=", 1) for arg in args if "=" in arg)
    return lists["memory"].split(","), lists["compute"].split(","), args


def test_local_hosts_are_split_into_memory_and_compute():
    config = _load(CLUSTER / "local.yaml")
    memory, compute, _ = _local_roles(config)
    assert memory and compute
    assert not set(memory) & set(compute)
    assert sorted(memory + compute) == sorted(config["provider"]["worker_ips"])
    assert config["provider"]["head_ip"] not in memory + compute
    start = " ".join(config["worker_start_ray_commands"])
    assert '--resources="$RESOURCES"' in start and "RESOURCES=$(bash" in start


def _run_node_resources(tmp_path: Path, args: list[str], addresses: str, gpus: int) -> subprocess.CompletedProcess:
    """Run cluster/local/node-resources.sh as a host with ``addresses`` and ``gpus`` GPUs (stubbed hostname and
    nvidia-smi)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "hostname").write_text(f'#!/bin/sh\nif [ "$1" = -I ]; then echo "{addresses} "; else echo stubhost; fi\n')
    gpu_lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
    (stubs / "nvidia-smi").write_text("#!/bin/sh\n" + (gpu_lines or "exit 9\n"))
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(CLUSTER / "local" / "node-resources.sh"), *args],
                          capture_output=True, text=True, env=env, timeout=30)


def test_local_node_resources_script_gives_each_host_its_role(tmp_path):
    config = _load(CLUSTER / "local.yaml")
    memory, compute, args = _local_roles(config)

    as_memory = _run_node_resources(tmp_path, args, f"{memory[0]} 172.17.0.1", gpus=0)
    assert as_memory.returncode == 0, as_memory.stderr
    resources = json.loads(as_memory.stdout)
    assert resources.get(MEMORY_RESOURCE, 0) >= 1 and COMPUTE_RESOURCE not in resources

    as_gpu = _run_node_resources(tmp_path, args, compute[-1], gpus=8)
    assert as_gpu.returncode == 0, as_gpu.stderr
    assert json.loads(as_gpu.stdout) == {COMPUTE_RESOURCE: 8}, "GPU hosts take no shards"

    unlisted = _run_node_resources(tmp_path, args, "10.9.9.9", gpus=8)
    assert unlisted.returncode != 0 and unlisted.stdout == "" and "neither" in unlisted.stderr
    no_gpu = _run_node_resources(tmp_path, args, compute[0], gpus=0)
    assert no_gpu.returncode != 0 and no_gpu.stdout == ""
    # A host that is a prefix of a listed one is not that one (10.0.0.1 vs 10.0.0.11).
    prefix = _run_node_resources(tmp_path, args, memory[0][:-1], gpus=0)
    assert prefix.returncode != 0


def _shard_capacity(name: str, config: dict, prepared: dict) -> int:
    """Shards the memory nodes a fresh cluster starts with can hold (engram_memory units)."""
    if prepared["provider"]["type"] == "local":
        memory, _, args = _local_roles(config)
        per_host = next((int(a) for a in args if a.isdigit()), 2)
        return len(memory) * per_host
    types = prepared["available_node_types"]
    return sum(spec.get("min_workers", 0) * spec["resources"].get(MEMORY_RESOURCE, 0) for spec in types.values())


def _remote_mounts(prepared: dict) -> list[str]:
    return [os.path.normpath(remote) for remote in prepared["file_mounts"]]


def _expand_home(path: str, home: str) -> str:
    return os.path.normpath(home + path[1:] if path.startswith("~") else path)


@pytest.mark.parametrize("name", RAY_CONFIG_NAMES)
def test_ray_config_installs_the_project_and_starts_a_secured_memory_service(name):
    config = _load(CLUSTER / name)
    prepared = _prepare_and_validate(config)
    provider = prepared["provider"]["type"]
    user = prepared["auth"]["ssh_user"]
    home = f"/home/{user}"

    # The repository reaches every node, and every node installs it from there.
    repo_mounts = [remote for remote, local in prepared["file_mounts"].items() if os.path.normpath(local) == "."]
    assert len(repo_mounts) == 1, "file_mounts must carry this repository"
    repo = _expand_home(repo_mounts[0], home)
    for role in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[role] if re.search(r"pip install\b.*\s-e\s+\S*\.", c)]
        assert installs, f"{role} must pip-install this project"
        cds = [re.search(r"cd\s+(\S+)\s*&&", c) for c in installs]
        assert all(m and _expand_home(m.group(1), home) == repo for m in cds), installs
    if provider in CLOUD_EXTRA:
        extra = CLOUD_EXTRA[provider]
        assert any(f'-e ".[{extra}]"' in c for c in prepared["head_setup_commands"]), \
            f"the head runs the autoscaler, which needs engram-memory[{extra}]"
        import tomllib

        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extra in extras

    # Ray's token auth: the token file reaches every node and every `ray start` runs in token mode.
    assert f"{home}/.ray/auth_token" in _remote_mounts(prepared)
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[role] if re.search(r"\bray start\b", c)]
        assert starts and all("export RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in starts), role

    # The head starts the memory service after Ray, with TLS, mutual TLS and a data root.
    head = prepared["head_start_ray_commands"]
    ups = _commands_running(head, "engram memory up")
    assert len(ups) == 1, "the head starts the memory service once"
    ray_start_at = next(i for i, c in enumerate(head) if "ray start --head" in c)
    assert any("engram memory up" in c for c in head[ray_start_at + 1:]), "after `ray start --head`"
    flags = _flags(ups[0])
    for flag in (*TLS_FLAGS, "--data-root", "--config", "--shards", "--address"):
        assert flags.get(flag), f"`engram memory up` must pass {flag}"
    parsed = _parse_engram(["memory", "up"], ups[0])
    assert parsed.tls_cert and parsed.tls_key and parsed.tls_client_ca and parsed.data_root
    # The shards read the TLS files on their own nodes: they must lie in a folder every node gets.
    for flag in TLS_FLAGS:
        path = os.path.normpath(flags[flag])
        assert os.path.isabs(path)
        mounts = [_expand_home(mount, home) for mount in _remote_mounts(prepared)]
        assert any(path.startswith(mount + "/") for mount in mounts), f"{flag} {path} is on no file mount"
    # The data root is on shared storage that every node's setup mounts (checked to be a mount point).
    data_root = flags["--data-root"]
    mount_point = "/mnt/engram"
    assert data_root.startswith(mount_point + "/")
    assert any(f"mountpoint -q {mount_point}" in c for c in prepared["setup_commands"])
    # The tables it deploys load, and the memory nodes a fresh cluster starts with can hold its shards.
    from memory_service.core.table_spec import load_table_specs

    assert load_table_specs(ROOT / flags["--config"])
    # Two copies of every shard (a shard may die without losing a row), which the memory nodes can hold.
    assert flags["--replicas"] == "2"
    assert 1 <= int(flags["--shards"]) * 2 <= _shard_capacity(name, config, prepared)
    # The admin token stays on the head.
    assert any("ENGRAM_MEMORY_ADMIN_TOKEN" in c and "sed -i" in c for c in prepared["worker_setup_commands"])


# ---- KubeRay manifests ---------------------------------------------------------------------------------------


def _strict(schema):
    """A copy of a CRD's openAPIV3Schema that jsonschema checks the way the API server does with strict validation.

    - objects with ``properties`` and no ``additionalProperties`` refuse unknown fields (the API server would
      prune them silently, or refuse them with --validate=strict), unless ``x-kubernetes-preserve-unknown-fields``;
    - ``x-kubernetes-int-or-string`` accepts an integer or a string (the CRDs also spell it as anyOf);
    - ``nullable`` admits null;
    - other ``x-kubernetes-*`` keys (list types, CEL ``x-kubernetes-validations``) are left to the server:
      jsonschema ignores unknown keywords, and the manifests set none of the fields the CEL rules guard
      (test_cel_rules_are_only_about_fields_the_manifests_leave_out checks that).
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:  # a mapping of field names (any name, even "default") to schemas
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    open_object = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _crd_schema(kind: str) -> dict:
    with open(SCHEMAS / f"{kind}-v1.openapi.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def validators():
    return {kind: jsonschema.Draft7Validator(_strict(_crd_schema(kind))) for kind in ("raycluster", "rayjob")}


def _errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_vendored_schemas_are_the_crds_and_noted():
    readme = (SCHEMAS / "README.md").read_text()
    assert "ray-project/kuberay" in readme and "v1.7.0" in readme and "Apache" in readme
    assert re.search(r"\b[0-9a-f]{40}\b", readme), "the README names the commit"
    for kind, spec_fields in (("raycluster", {"headGroupSpec", "workerGroupSpecs", "authOptions"}),
                              ("rayjob", {"entrypoint", "clusterSelector", "rayClusterSpec"})):
        schema = _crd_schema(kind)
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec", "status"}
        assert spec_fields <= set(schema["properties"]["spec"]["properties"])
        jsonschema.Draft7Validator.check_schema(_strict(schema))


def test_cel_rules_are_only_about_fields_the_manifests_leave_out():
    """The CEL rules jsonschema cannot run: the manifests must not set the fields they guard."""
    guarded = []

    def walk(node, path):
        if isinstance(node, dict):
            if "x-kubernetes-validations" in node:
                guarded.append(path)
            for key, value in node.get("properties", {}).items():
                walk(value, path + (key,))
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    walk(node[key], path + ("*",))

    walk(_crd_schema("raycluster"), ())
    assert guarded, "the schema has CEL rules; if none remain, this test has nothing left to say"
    cluster = _load(KUBERAY / "raycluster.yaml")
    for path in guarded:
        node = cluster
        for key in path:
            node = node.get(key) if isinstance(node, dict) and key != "*" else None
        assert node is None, f"{'.'.join(path)} has CEL rules this test cannot check"


def test_raycluster_manifest_validates(validators):
    cluster = _load(KUBERAY / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert _errors(validators["raycluster"], cluster) == []


def test_rayjob_manifest_validates(validators):
    job = _load(KUBERAY / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert _errors(validators["rayjob"], job) == []


def _broken(document, path, value=None, *, rename=None):
    broken = copy.deepcopy(document)
    node = broken
    for key in path[:-1]:
        node = node[key]
    if rename:
        node[rename] = node.pop(path[-1])
    else:
        node[path[-1]] = value
    return broken


def test_broken_raycluster_copies_fail(validators):
    cluster = _load(KUBERAY / "raycluster.yaml")
    cases = {
        "misspelt field": (_broken(cluster, ("spec", "workerGroupSpecs"), rename="workerGroupSpec"), "workerGroupSpec"),
        "misspelt nested field": (_broken(cluster, ("spec", "workerGroupSpecs", 0, "minReplicas"), rename="minReplica"),
                                  "minReplica"),
        "wrong type": (_broken(cluster, ("spec", "workerGroupSpecs", 0, "minReplicas"), "2"), "is not of type"),
        "rayStartParams must be strings": (_broken(cluster, ("spec", "workerGroupSpecs", 0, "rayStartParams",
                                                             "object-store-memory"), 17179869184), "is not of type"),
        "bad quantity": (_broken(cluster, ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                                           "resources", "limits", "memory"), "480 GB"), "does not match"),
        "bad enum": (_broken(cluster, ("spec", "authOptions", "mode"), "tokens"), "is not one of"),
    }
    for case, (document, expected) in cases.items():
        errors = _errors(validators["raycluster"], document)
        assert errors and any(expected in e for e in errors), f"{case}: {errors}"


def test_broken_rayjob_copies_fail(validators):
    job = _load(KUBERAY / "rayjob.yaml")
    for document, expected in (
        (_broken(job, ("spec", "shutdownAfterJobFinish"), True), "shutdownAfterJobFinish"),
        (_broken(job, ("spec", "backoffLimit"), "none"), "is not of type"),
        (_broken(job, ("spec", "entrypoint"), ["engram", "train"]), "is not of type"),
    ):
        errors = _errors(validators["rayjob"], document)
        assert errors and any(expected in e for e in errors), errors


def _group_resources(group: dict) -> dict:
    """The custom resources a group's `ray start --resources` gets: KubeRay passes the string as is to the shell."""
    value = group["rayStartParams"]["resources"]
    words = shlex.split(value)  # '"{\"engram_memory\": 2}"' -> the JSON the shell hands to ray start
    assert len(words) == 1
    return json.loads(words[0])


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2), 1)


def _container(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container


def _mounts(template: dict) -> dict[str, str]:
    """mount path -> volume source kind/name of a pod template's container."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    out = {}
    for mount in _container(template).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        source = volume.get("persistentVolumeClaim", {}).get("claimName") or volume.get("secret", {}).get("secretName")
        out[mount["mountPath"]] = source
    return out


def test_raycluster_groups_advertise_their_role_and_start_a_secured_service():
    cluster = _load(KUBERAY / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == 2
    roles = {name: _group_resources(g) for name, g in groups.items()}
    (memory,) = [n for n, r in roles.items() if r.get(MEMORY_RESOURCE, 0) >= 1]
    (gpu,) = [n for n, r in roles.items() if r.get(COMPUTE_RESOURCE, 0) >= 1]
    assert MEMORY_RESOURCE not in roles[gpu] and COMPUTE_RESOURCE not in roles[memory]
    assert "resources" not in spec["headGroupSpec"]["rayStartParams"]
    assert groups[memory]["minReplicas"] >= 1

    # Memory pods: guaranteed memory, and Ray's `memory` + object store inside the container's limit.
    memory_container = _container(groups[memory]["template"])
    requests, limits = memory_container["resources"]["requests"], memory_container["resources"]["limits"]
    assert _quantity_bytes(requests["memory"]) == _quantity_bytes(limits["memory"])
    params = groups[memory]["rayStartParams"]
    assert int(params["memory"]) + int(params["object-store-memory"]) < _quantity_bytes(limits["memory"])
    gpu_container = _container(groups[gpu]["template"])
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) == roles[gpu][COMPUTE_RESOURCE]

    # The head starts the memory service with TLS, mutual TLS and a data root on the shared volume.
    head = spec["headGroupSpec"]["template"]
    post_start = " ".join(_container(head)["lifecycle"]["postStart"]["exec"]["command"])
    inner = [c for c in shlex.split(post_start) if "engram memory up" in c]  # the quoted script nohup runs
    assert inner
    (up,) = _commands_running(inner, "engram memory up")
    flags = _flags(up)
    parsed = _parse_engram(["memory", "up"], up)
    assert parsed.tls_cert and parsed.tls_key and parsed.tls_client_ca and parsed.data_root
    head_mounts, memory_mounts = _mounts(head), _mounts(groups[memory]["template"])
    for flag in TLS_FLAGS:  # read by the shards on the memory pods
        directory = os.path.dirname(flags[flag])
        assert directory in memory_mounts and memory_mounts[directory] == head_mounts.get(directory), flag
    data_mount = next(p for p in memory_mounts if flags["--data-root"].startswith(p + "/"))
    assert head_mounts[data_mount] == memory_mounts[data_mount] == _mounts(groups[gpu]["template"])[data_mount]
    assert flags["--replicas"] == "2"
    assert 1 <= int(flags["--shards"]) * 2 <= groups[memory]["minReplicas"] * roles[memory][MEMORY_RESOURCE]
    assert flags["--config"].startswith("/home/ray/engram/")
    from memory_service.core.table_spec import load_table_specs

    assert load_table_specs(ROOT / os.path.relpath(flags["--config"], "/home/ray/engram"))

    # Tokens: the head holds both, the GPU pods only the data token, the memory pods none.
    def env_names(template):
        return {e["name"] for e in _container(template).get("env", [])}

    assert {"ENGRAM_MEMORY_TOKEN", "ENGRAM_MEMORY_ADMIN_TOKEN"} <= env_names(head)
    assert env_names(groups[gpu]["template"]) == {"ENGRAM_MEMORY_TOKEN"}
    assert not env_names(groups[memory]["template"]) & {"ENGRAM_MEMORY_TOKEN", "ENGRAM_MEMORY_ADMIN_TOKEN"}


def test_rayjob_trains_on_that_cluster_with_its_memory_service():
    cluster = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / "rayjob.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["engram", "train"]
    parsed = _parse_engram(["train"], argv[2:])
    from protos.wire import CONTROLLER_NAME

    assert parsed.controller == CONTROLLER_NAME, "the controller `engram memory up` started"
    assert parsed.address == "auto"
    assert (ROOT / os.path.relpath(parsed.config, "/home/ray/engram")).exists()
    head = cluster["spec"]["headGroupSpec"]["template"]
    post_start = " ".join(_container(head)["lifecycle"]["postStart"]["exec"]["command"])
    data_root = _flags(_commands_running([c for c in shlex.split(post_start) if "engram memory up" in c],
                                         "engram memory up")[0])["--data-root"]
    assert parsed.output_dir.startswith(data_root + "/"), "run checkpoints hold the tables: inside the data root"


def test_dockerfile_installs_the_project_for_the_manifests():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    import ray

    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}\b", dockerfile, re.M)
    assert re.search(r"^RUN .*pip install .*-e \.", dockerfile, re.M)
    assert "WORKDIR /home/ray/engram" in dockerfile
    cluster = _load(KUBERAY / "raycluster.yaml")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    for name in ("compute", "memory_service", "protos", "kernels", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", dockerfile, re.M), name


def _dns1035_label(name: str) -> bool:
    return bool(re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name))


def test_manifests_pass_the_operators_own_rules():
    """Rules KubeRay v1.7.0 enforces in its controller (utils/validation.go), not in the CRD schema."""
    cluster = _load(KUBERAY / "raycluster.yaml")
    spec = cluster["spec"]
    assert _dns1035_label(cluster["metadata"]["name"])
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert not ("resources" in group and "resources" in group["rayStartParams"]), "one place for Ray resources"
        assert "labels" not in group["rayStartParams"]
    if spec["authOptions"]["mode"] == "token":  # token auth needs Ray 2.52.0 or later
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    assert len({g["groupName"] for g in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])

    job = _load(KUBERAY / "rayjob.yaml")
    js = job["spec"]
    assert _dns1035_label(job["metadata"]["name"])
    if js.get("clusterSelector"):  # a job on a cluster the operator did not create
        assert js["clusterSelector"].get("ray.io/cluster")
        assert js.get("backoffLimit", 0) == 0 and not js.get("suspend")
        assert js.get("submissionMode", "K8sJobMode") != "SidecarMode"
    if not js.get("shutdownAfterJobFinishes"):
        assert js.get("ttlSecondsAfterFinished", 0) == 0
    assert js.get("activeDeadlineSeconds", 1) > 0


def _documented_commands(path: Path) -> list[list[str]]:
    """Every `engram memory ...` / `engram train ...` a doc shows, as argument lists with placeholders filled in."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # shell line continuations
    commands = []
    for match in re.finditer(r"engram (?:memory|train)\b[^'`#;|)\n]*", text):
        command = match.group(0).strip()
        command = re.sub(r"\[(--[^\]]+)\]", r"\1", command)  # [--shards M] -> --shards M
        command = re.sub(r"<[^>]*>", "x", command)  # <run checkpoint> -> x
        words = command.split()
        if words == ["engram", "train"] or words[2:3] == ["..."]:
            continue  # prose that names the command, not a command line
        commands.append([{"M": "4", "N": "4", "...": "x"}.get(word, word) for word in words])
    return commands


@pytest.mark.parametrize("doc", ["docs/operations.md", "cluster/README.md"])
def test_documented_commands_parse_with_the_cli(doc):
    commands = _documented_commands(ROOT / doc)
    assert len(commands) >= 3
    seen = set()
    for words in commands:
        try:
            _parse_engram([], words[1:])
        except SystemExit:
            pytest.fail(f"{doc}: `{' '.join(words)}` does not parse with the engram CLI")
        seen.add(" ".join(words[1:3]))
    if doc == "docs/operations.md":
        for sub in ("memory up", "memory status", "memory scale", "memory checkpoint", "memory restore",
                    "memory down", "train --config"):
            assert sub in seen, f"{doc} shows no `engram {sub}`"
