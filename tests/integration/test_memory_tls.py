"""TLS with operator-given certificate files: a client trusting the certificate gets through, plaintext does not."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading

import grpc
import pytest

from compute.memory.client import MemoryClient, MemoryServiceError
from memory_service.auth import TlsFiles
from memory_service.directory import DirectoryServicer
from memory_service.server import start_server
from protos import engram_memory_v1_pb2 as pb
from protos import engram_memory_v1_pb2_grpc as pb_grpc


@pytest.fixture()
def tls_files(tmp_path) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return TlsFiles(str(cert), str(key))


@pytest.fixture()
def tls_directory(tls_files):
    """A DirectoryService over TLS on its own event loop thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = DirectoryServicer(lambda: pb.Routing(epoch=3), lambda: [])
    server, address = asyncio.run_coroutine_threadsafe(start_server(
        lambda s: pb_grpc.add_DirectoryServiceServicer_to_server(servicer, s), ["engram.memory.v1.DirectoryService"],
        token="tls-token", tls=tls_files), loop).result()
    yield address, tls_files
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def test_tls_client_connects_and_plaintext_is_refused(tls_directory):
    address, tls = tls_directory
    with MemoryClient(address, "tls-token", tls_cert_file=tls.cert_file) as client:
        assert client.epoch == 3
    with pytest.raises(MemoryServiceError) as caught:
        MemoryClient(address, "tls-token")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
