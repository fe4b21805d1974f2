"""TLS and mutual TLS end to end, with certificates made here (trustme): real shards, controller and
directory on the session's Ray, the `engram memory` CLI and a training job. What docs/security.md claims."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute.memory.client import MemoryClient, MemoryServiceError
from compute.train.config import TrainConfig
from compute.train.tables import engram_table_specs
from memory_service.auth import TlsFiles
from memory_service.checkpoint import PathRefused
from memory_service.controller import ControllerOptions, start_controller, stop_controller
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc
from protos.wire import NAMESPACE, ClientTls, bearer_metadata
from tests.integration.memory_deploy import ADMIN_TOKEN, TOKEN, reference_rows, spec
from tests.integration.tiny_runs import tiny_run

trustme = pytest.importorskip("trustme")

ROOT = Path(__file__).resolve().parents[2]
TABLE = spec("tls_table", rows=2_000, dim=8, kind="sgd", lr=0.5)
ROWS = np.array([0, 1, 2, 63, 64, 1_999])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: the trusted CA, a server certificate it signed (IP SAN 127.0.0.1, serverAuth and
    clientAuth), a client certificate it signed, and a client and a server certificate of another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {}

    def write(name: str, blob) -> str:
        path = folder / name
        blob.write_to_path(str(path))
        files[name] = str(path)
        return str(path)

    write("ca.pem", ca.cert_pem)
    write("other-ca.pem", other_ca.cert_pem)
    for name, issuer, identities in (("server", ca, ("127.0.0.1", "localhost")), ("client", ca, ("trainer-1",)),
                                     ("stranger", other_ca, ("trainer-2",)),
                                     ("other-server", other_ca, ("127.0.0.1", "localhost"))):
        leaf = issuer.issue_cert(*identities)
        write(f"{name}.pem", leaf.cert_chain_pems[0])
        write(f"{name}.key", leaf.private_key_pem)
    return files


@contextlib.contextmanager
def tls_controller(tls: TlsFiles, data_root: Path, specs=(TABLE,), shards: int = 2, **tls_options):
    """A controller serving over ``tls`` with ``specs`` on ``shards`` shards; yields it and its connection info.
    ``tls_options``: ControllerOptions' tls_ca_file, tls_client_cert_file, tls_client_key_file."""
    name = f"test-tls-{uuid.uuid4().hex[:8]}"
    options = ControllerOptions(data_token=TOKEN, admin_token=ADMIN_TOKEN, tls=tls, host="127.0.0.1",
                                data_root=str(data_root), reflection=False, **tls_options)
    controller = start_controller(options, name=name)
    try:
        ray.get(controller.deploy.remote([s.to_dict() for s in specs], shards))
        yield controller, ray.get(controller.connection_info.remote()), name
    finally:
        stop_controller(name)


@pytest.fixture(scope="module")
def tls_service(ray_cluster, pki, tmp_path_factory):
    """One TLS (server-authenticated only) deployment for the module."""
    tls = TlsFiles(pki["server.pem"], pki["server.key"])
    with tls_controller(tls, tmp_path_factory.mktemp("tls-data"), tls_ca_file=pki["ca.pem"]) as (controller, info, _):
        yield controller, info


def tiny_training(data_root: Path) -> TrainConfig:
    """The shared tiny run, 3 steps; its output and memory checkpoint under ``data_root``."""
    return tiny_run(data_root, steps=3)


@pytest.fixture(scope="module")
def mtls_service(ray_cluster, pki, tmp_path_factory):
    """One mutual-TLS deployment for the module (client certificates must chain to the CA): the test
    table, and the tiny training run's Engram tables, which only the training job touches."""
    tls = TlsFiles(pki["server.pem"], pki["server.key"], client_ca_file=pki["ca.pem"])
    root = tmp_path_factory.mktemp("mtls-data")
    specs = [TABLE, *engram_table_specs(tiny_training(root))]
    with tls_controller(tls, root, specs=specs) as (controller, info, name):
        yield controller, info, root, name


def refused(directory: str, tls: ClientTls | None) -> MemoryServiceError:
    """The error a client gets when it cannot even fetch the routing."""
    with pytest.raises(MemoryServiceError) as caught:
        MemoryClient(directory, TOKEN, tls=tls).close()
    return caught.value


def raw_channel(address: str, tls: ClientTls | None) -> grpc.Channel:
    return grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)


def raw_stats(address: str, tls: ClientTls | None) -> grpc.StatusCode | None:
    """A raw Stats call on a shard with the data token: None if it answered, else its status code."""
    with raw_channel(address, tls) as channel:
        try:
            pb_grpc.ShardServiceStub(channel).Stats(pb.StatsRequest(), metadata=bearer_metadata(TOKEN), timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return None


def lookup_and_push(client: MemoryClient, step: int) -> torch.Tensor:
    """Rows read back as initialised, one SGD push, rows moved by exactly -lr * grad."""
    before = client.lookup("tls_table", ROWS, dtype=torch.float32).result()
    grads = torch.ones(len(ROWS), TABLE.dim)
    assert client.push("tls_table", ROWS, grads, step=step).result().applied_rows == len(ROWS)
    after = client.lookup("tls_table", ROWS, dtype=torch.float32).result()
    torch.testing.assert_close(after, before - 0.5 * grads)
    return before


# ---- 1. TLS --------------------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_works_plaintext_and_other_cas_are_refused(tls_service, pki):
    controller, info = tls_service
    assert info["tls"] == ClientTls(pki["ca.pem"])  # what the controller tells data clients: the servers' CA only
    trusted = ClientTls(pki["ca.pem"])
    with MemoryClient(info["directory"], TOKEN, tls=trusted) as client:
        # With TLS the Unix-socket fast path is off: every shard is reached over TLS on TCP.
        assert client.co_located_shards == frozenset()
        shards = [client.shard_address(i) for i in range(2)]
        assert all(not address.startswith("unix:") for address in shards)
        before = lookup_and_push(client, step=0)
        torch.testing.assert_close(before, reference_rows(TABLE, ROWS))

    assert refused(info["directory"], None).code == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS server
    assert refused(info["directory"], ClientTls(pki["other-ca.pem"])).code == grpc.StatusCode.UNAVAILABLE
    for address in shards:  # the shards refuse the same way as the directory
        assert raw_stats(address, trusted) is None
        assert raw_stats(address, None) == grpc.StatusCode.UNAVAILABLE
        assert raw_stats(address, ClientTls(pki["other-ca.pem"])) == grpc.StatusCode.UNAVAILABLE


# ---- 3. Tokens over TLS -----------------------------------------------------------------------------------------


def test_over_tls_the_data_token_is_refused_admin_rpcs_and_health_needs_no_token(tls_service, pki):
    controller, info = tls_service
    trusted = ClientTls(pki["ca.pem"])
    with MemoryClient(info["directory"], TOKEN, tls=trusted) as client:
        address = client.shard_address(0)
    with raw_channel(address, trusted) as channel:
        shard = pb_grpc.ShardServiceStub(channel)
        for token, expected in ((TOKEN, grpc.StatusCode.PERMISSION_DENIED),
                                ("not-the-token-0123456789", grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as caught:
                shard.DropTable(pb.DropTableRequest(table="tls_table"), metadata=bearer_metadata(token), timeout=10)
            assert caught.value.code() == expected
        with pytest.raises(grpc.RpcError) as caught:
            shard.Stats(pb.StatsRequest(), timeout=10)  # no token at all
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "engram.memory.v1.ShardService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with raw_channel(info["directory"], trusted) as channel:
        directory = pb_grpc.DirectoryServiceStub(channel)
        routing = directory.GetRouting(pb.GetRoutingRequest(), metadata=bearer_metadata(TOKEN), timeout=10)
        assert routing.epoch >= 1
        assert not any(shard.row_stream_address for shard in routing.shards)  # rows travel only over TLS
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The refused DropTable changed nothing: the table is still served.
    with MemoryClient(info["directory"], TOKEN, tls=trusted) as client:
        assert [t.name for t in client.tables()] == ["tls_table"]
        assert client.lookup("tls_table", ROWS).result().shape == (len(ROWS), TABLE.dim)


def test_over_tls_rotated_tokens_replace_the_old_ones_after_the_grace_period(tls_service, pki):
    controller, info = tls_service
    trusted = ClientTls(pki["ca.pem"])
    with MemoryClient(info["directory"], TOKEN, tls=trusted) as client:
        address = client.shard_address(1)

    def answers(token: str) -> list[grpc.StatusCode | None]:
        """Whether the directory and a shard take ``token``: None where they do, else the refusal."""
        codes = []
        with raw_channel(info["directory"], trusted) as channel:
            try:
                pb_grpc.DirectoryServiceStub(channel).ListTables(pb.ListTablesRequest(), metadata=bearer_metadata(token),
                                                                 timeout=10)
                codes.append(None)
            except grpc.RpcError as error:
                codes.append(error.code())
        with raw_channel(address, trusted) as channel:
            try:
                pb_grpc.ShardServiceStub(channel).Stats(pb.StatsRequest(), metadata=bearer_metadata(token), timeout=10)
                codes.append(None)
            except grpc.RpcError as error:
                codes.append(error.code())
        return codes

    new_data, new_admin = "rotated-data-token-0123456789", "rotated-admin-token-0123456789"
    rotated = ray.get(controller.rotate_tokens.remote(new_data, new_admin, 0.0))  # no grace: the old ones end now
    assert rotated["token"] == new_data
    assert answers(TOKEN) == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert answers(new_data) == [None, None]
    assert len(ray.get(controller.status.remote())) == 2  # the controller holds the new admin token
    ray.get(controller.rotate_tokens.remote(TOKEN, ADMIN_TOKEN, 60.0))  # back, with a grace period
    assert answers(TOKEN) == [None, None] and answers(new_data) == [None, None]


# ---- 2. Mutual TLS ----------------------------------------------------------------------------------------------


def test_mutual_tls_needs_a_client_certificate_of_the_trusted_ca(mtls_service, pki):
    controller, info, _, _ = mtls_service
    # The controller gives data clients the CA and, as the cluster's identity, the servers' certificate.
    assert info["tls"] == ClientTls(pki["ca.pem"], pki["server.pem"], pki["server.key"])
    client_cert = ClientTls(pki["ca.pem"], pki["client.pem"], pki["client.key"])
    for tls in (client_cert, info["tls"]):
        with MemoryClient(info["directory"], TOKEN, tls=tls) as client:
            assert client.co_located_shards == frozenset()
            lookup_and_push(client, step=0 if tls is client_cert else 1)
            shards = [client.shard_address(i) for i in range(2)]

    no_cert = ClientTls(pki["ca.pem"])
    stranger = ClientTls(pki["ca.pem"], pki["stranger.pem"], pki["stranger.key"])
    assert refused(info["directory"], no_cert).code == grpc.StatusCode.UNAVAILABLE
    assert refused(info["directory"], stranger).code == grpc.StatusCode.UNAVAILABLE
    assert refused(info["directory"], None).code == grpc.StatusCode.UNAVAILABLE
    for address in shards:
        assert raw_stats(address, client_cert) is None
        assert raw_stats(address, no_cert) == grpc.StatusCode.UNAVAILABLE
        assert raw_stats(address, stranger) == grpc.StatusCode.UNAVAILABLE
        assert raw_stats(address, None) == grpc.StatusCode.UNAVAILABLE


def test_under_mutual_tls_the_controllers_admin_calls_work(mtls_service, pki):
    controller, info, root, _ = mtls_service
    assert len(ray.get(controller.status.remote())) == 2
    assert ray.get(controller.scale.remote(3))["tls_table"] > 0
    status = ray.get(controller.status.remote())
    all_slots = sum(table["num_slots"] for table in ray.get(controller.table_specs.remote()))
    assert [row["shard"] for row in status] == [0, 1, 2] and sum(row["slots"] for row in status) == all_slots

    manifest = Path(ray.get(controller.checkpoint.remote("ckpt/one")))
    assert manifest == root.resolve() / "ckpt" / "one" / "manifest.json"
    assert json.loads(manifest.read_text())["tables"][0]["spec"]["name"] == "tls_table"
    written = [manifest, *(manifest.parent / "tls_table").glob("*.npz")]
    assert len(written) == 4 and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in written)
    for folder in (root / "ckpt", manifest.parent, manifest.parent / "tls_table"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for outside in ("../no-such-folder", "..", str(root.parent)):  # whether it exists or not, the same refusal
        with pytest.raises(PathRefused, match=f"must lie inside the data root {root.resolve()}; '.*' does not$"):
            ray.get(controller.checkpoint.remote(outside))

    client_cert = ClientTls(pki["ca.pem"], pki["client.pem"], pki["client.key"])
    with MemoryClient(info["directory"], TOKEN, tls=client_cert) as client:  # the client follows the move
        assert client.lookup("tls_table", ROWS).result().shape == (len(ROWS), TABLE.dim)
        assert len({client.shard_address(i) for i in range(3)}) == 3


def test_mutual_tls_with_a_server_ca_other_than_the_client_ca(ray_cluster, pki, tmp_path):
    """The servers' certificate comes from one CA, clients' from another: the controller and its jobs
    present the client identity they are given, never the servers' key."""
    tls = TlsFiles(pki["other-server.pem"], pki["other-server.key"], client_ca_file=pki["ca.pem"])
    with tls_controller(tls, tmp_path, shards=1, tls_ca_file=pki["other-ca.pem"],
                        tls_client_cert_file=pki["client.pem"], tls_client_key_file=pki["client.key"]) as (_, info, _):
        assert info["tls"] == ClientTls(pki["other-ca.pem"], pki["client.pem"], pki["client.key"])
        with MemoryClient(info["directory"], TOKEN, tls=info["tls"]) as client:
            assert client.lookup("tls_table", ROWS).result().shape == (len(ROWS), TABLE.dim)


# ---- 4. The CLI -------------------------------------------------------------------------------------------------


def test_cli_up_status_checkpoint_down_over_mutual_tls(ray_cluster, pki, tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text("tables:\n  - name: cli_tls\n    rows: 1000\n    dim: 8\n    num_slots: 16\n")
    home, data_root = tmp_path / "home", tmp_path / "data"
    env = {**os.environ, "ENGRAM_HOME": str(home), "ENGRAM_MEMORY_TOKEN": TOKEN, "ENGRAM_MEMORY_ADMIN_TOKEN": ADMIN_TOKEN}
    common = ["--address", ray_cluster, "--name", f"cli-tls-{uuid.uuid4().hex[:8]}"]

    def engram(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "compute.cli", "memory", *args, *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    up = engram("up", "--config", str(config), "--shards", "2", "--host", "127.0.0.1", "--data-root", str(data_root),
                "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--tls-client-ca", pki["ca.pem"])
    try:
        assert "on 2 shard(s)" in up and f"checkpoints under {data_root.resolve()}" in up
        state_file = home / "memory.json"
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        state = json.loads(state_file.read_text())
        assert (state["token"], state["admin_token"]) == (TOKEN, ADMIN_TOKEN)
        assert (state["tls_ca_file"], state["tls_cert_file"], state["tls_key_file"]) == (
            pki["ca.pem"], pki["server.pem"], pki["server.key"])

        status = engram("status").strip().splitlines()
        assert "p99 ms" in status[0] and len(status) == 3
        # A trainer with its own client certificate reaches the service `up` recorded; one without is refused.
        client_cert = ClientTls(pki["ca.pem"], pki["client.pem"], pki["client.key"])
        with MemoryClient(state["directory"], state["token"], tls=client_cert) as client:
            assert client.lookup("cli_tls", ROWS[:3]).result().shape == (3, 8)
        assert refused(state["directory"], ClientTls(pki["ca.pem"])).code == grpc.StatusCode.UNAVAILABLE

        assert "manifest.json" in engram("checkpoint", "saved")
        assert (data_root / "saved" / "manifest.json").exists()
        assert len(list((data_root / "saved" / "cli_tls").glob("shard-*.npz"))) == 2
    finally:
        assert "memory service stopped" in engram("down")
    assert not (home / "memory.json").exists()


# ---- 5. A training job --------------------------------------------------------------------------------------------


def test_a_training_job_over_mutual_tls_trains_like_in_process_tables(mtls_service, tmp_path):
    """Ray Train workers reach the shards with the TLS settings the controller hands out; the final
    checkpoint's memory tables are written by the controller over mutual TLS, under the data root."""
    from compute.train.checkpoints import memory_checkpoint
    from compute.train.job import RunMemory, run_training
    from memory_service.deploy import MemoryHandle
    from compute.train.loop import EngramTrainer, WorkerContext

    controller, info, root, name = mtls_service
    config = tiny_training(root)
    handle = MemoryHandle(info["directory"], info["token"], info["tls"], name, NAMESPACE)
    tables = [spec.name for spec in engram_table_specs(config)]
    before = ray.get(controller.checksums.remote())
    summary = run_training(config, memory=RunMemory(handle))
    after = ray.get(controller.checksums.remote())
    remote_losses = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(remote_losses) == 3
    # Every Engram table's rows trained on every shard, and the losses are those of in-process tables.
    assert all(a != b for table in tables for a, b in zip(before[table], after[table], strict=True))
    assert (memory_checkpoint(summary["checkpoint"]) / "manifest.json").is_file()
    local = EngramTrainer(config.replace(memory__tables="local", output_dir=str(tmp_path / "local")),
                          WorkerContext(device=torch.device("cpu")))
    try:
        local_losses = local.train()
    finally:
        local.close()
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-6)
