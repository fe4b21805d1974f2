"""The floor under a lookup over TCP: how long one reply of N bytes takes to cross loopback from another process.

Two ways side by side, each against a server process of its own: a plain TCP socket (the client asks with a few bytes,
the server answers with the N bytes, the client reads them into one buffer) and a ``grpc.aio`` unary call with the
memory service's channel and server options (``protos.wire.transport_options``) whose reply is the N bytes, as
``Lookup`` answers a client off the shards' machine. A 64K-row bfloat16 lookup of dim 64 is 8 MiB; what the call
takes here is the least any lookup of that size over TCP takes, before the shard gathers a row.
Run: ``python -m bench.transport [--mib 1 4 8 16]``; prints a table, writes bench/results/transport.json and a PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import time

import grpc

from bench.results_files import figure, write_json
from protos.wire import DEFAULT_MAX_MESSAGE_BYTES, transport_options

ASK = b"rows, pls"
METHOD = "/bench.Transport/Reply"


def _serve_socket(reply_bytes: int, ready) -> None:
    reply = os.urandom(reply_bytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        ready.put(server.getsockname()[1])
        connection, _ = server.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while connection.recv(len(ASK), socket.MSG_WAITALL):  # one whole ask, one reply
            connection.sendall(reply)


def _serve_grpc(reply_bytes: int, ready) -> None:
    reply = os.urandom(reply_bytes)

    async def answer(request: bytes, context) -> bytes:
        return reply

    async def serve() -> None:
        server = grpc.aio.server(options=transport_options(DEFAULT_MAX_MESSAGE_BYTES))
        handler = grpc.unary_unary_rpc_method_handler(answer, request_deserializer=bytes, response_serializer=bytes)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Transport", {"Reply": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def _time_socket(port: int, reply_bytes: int, calls: int) -> list[float]:
    buffer = memoryview(bytearray(reply_bytes))
    seconds = []
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(calls):
            start, received = time.perf_counter(), 0
            connection.sendall(ASK)
            while received < reply_bytes:
                received += connection.recv_into(buffer[received:])
            seconds.append(time.perf_counter() - start)
    return seconds


def _time_grpc(port: int, reply_bytes: int, calls: int) -> list[float]:
    async def timed() -> list[float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=transport_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
            call = channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
            seconds = []
            for _ in range(calls):
                start = time.perf_counter()
                reply = await call(ASK)
                seconds.append(time.perf_counter() - start)
                assert len(reply) == reply_bytes
            return seconds

    return asyncio.run(timed())


WAYS = {"tcp_socket": (_serve_socket, _time_socket), "grpc_aio": (_serve_grpc, _time_grpc)}


def measure(way: str, reply_bytes: int, calls: int, warmup: int = 5) -> list[float]:
    """Seconds per call of ``way`` for replies of ``reply_bytes``, against a server process started for it."""
    serve, time_calls = WAYS[way]
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    server = context.Process(target=serve, args=(reply_bytes, ready), daemon=True)
    server.start()
    try:
        return time_calls(ready.get(timeout=60), reply_bytes, warmup + calls)[warmup:]
    finally:
        server.kill()
        server.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[1, 4, 8, 16], help="reply sizes in MiB")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    records = []
    for mib in args.mib:
        reply_bytes = int(mib * (1 << 20))
        for way in WAYS:
            seconds = measure(way, reply_bytes, args.calls)
            p50 = statistics.median(seconds)
            records.append({"way": way, "mib": mib, "reply_bytes": reply_bytes, "calls": args.calls,
                            "p50_ms": 1e3 * p50, "gb_per_s": reply_bytes / p50 / 1e9, "seconds": seconds})
    print(f"{'MiB':>6}{'way':>12}{'p50 ms':>9}{'GB/s':>7}{'vs socket':>11}")
    for record in records:
        socket_ms = next(r["p50_ms"] for r in records if r["mib"] == record["mib"] and r["way"] == "tcp_socket")
        record["vs_socket"] = record["p50_ms"] / socket_ms
        print(f"{record['mib']:>6g}{record['way']:>12}{record['p50_ms']:>9.2f}{record['gb_per_s']:>7.2f}"
              f"{record['vs_socket']:>10.2f}x")
    print(f"\n1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)")
    write_json("transport", records)
    with figure("transport") as (fig, axes):
        for way in WAYS:
            mine = [r for r in records if r["way"] == way]
            axes.plot([r["mib"] for r in mine], [r["p50_ms"] for r in mine], marker="o", label=way)
        axes.set_xlabel("reply MiB")
        axes.set_ylabel("p50 ms per call, loopback")
        axes.legend()


if __name__ == "__main__":
    main()
