"""`engram memory ...`: deploy, inspect, scale, checkpoint, restore and stop the memory service."""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

STATE_FILE = "memory.json"


def _state_path() -> Path:
    """Where `up` records what it started (and the token, readable by this user only)."""
    return Path(os.environ.get("ENGRAM_HOME", Path.home() / ".engram")) / STATE_FILE


def _read_state() -> dict[str, Any]:
    path = _state_path()
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(state: dict[str, Any]) -> None:
    path = _state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)


def _holder_alive(state: dict[str, Any]) -> bool:
    """Whether the local head that `up` started still runs (False when `up` started none)."""
    pid = state.get("head_pid")
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _recorded_cluster(state: dict[str, Any]) -> str | None:
    """The cluster `up` recorded: the address it was given, or the local head it started while that runs."""
    if state.get("head_pid") and not _holder_alive(state):
        return None
    return state.get("ray_address")


def _connect(args, *, may_start: bool = False) -> dict[str, Any]:
    """Join --address, else the cluster `up` recorded; `up` (``may_start``) starts a local head if there is none.

    Never joins a Ray instance that this command was not given and `up` did not start.
    """
    from memory_service import deploy

    state = _read_state()
    if args.address:
        state = {"ray_address": args.address}
    elif _recorded_cluster(state) is None:
        if not may_start:
            raise ValueError(f"no running memory service recorded in {_state_path()}: run `engram memory up`, "
                             "or pass --address of the cluster that runs it")
        state = {}
        state["head_pid"], state["ray_address"] = deploy.start_local_head()
    deploy.connect(state["ray_address"], token=args.ray_token, verbose=args.verbose)
    return state


def _up(args) -> int:
    from memory_service.core.table_spec import load_table_specs
    from memory_service.deploy import (ADMIN_TOKEN_ENV, TOKEN_ENV, AccessTokens, ControllerOptions, TlsFiles,
                                       default_data_root, describe_shard_memory, start_controller)

    specs = load_table_specs(args.config)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("tls-cert/tls-key: give both or neither")
    if (args.tls_client_ca or args.tls_ca) and not args.tls_cert:
        raise ValueError("tls-client-ca/tls-ca: need --tls-cert and --tls-key")
    generated = AccessTokens.generate()
    tokens = AccessTokens(args.data_token or os.environ.get(TOKEN_ENV) or generated.data,
                          args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or generated.admin)
    state = _connect(args, may_start=True)
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    options = ControllerOptions(data_token=tokens.data, admin_token=tokens.admin, tls=tls, tls_ca_file=args.tls_ca,
                                tls_client_cert_file=args.tls_client_cert, tls_client_key_file=args.tls_client_key,
                                host=args.host, data_root=str(Path(args.data_root or default_data_root()).resolve()),
                                reflection=args.reflection, step_timeout_s=args.step_timeout_s,
                                shard_threads=args.shard_threads, tier_dir=args.tier_dir)
    controller = start_controller(options, name=args.name)
    import ray

    directory = ray.get(controller.deploy.remote([spec.to_dict() for spec in specs], args.shards, args.replicas))
    info = ray.get(controller.connection_info.remote())
    _write_state({**state, **_recorded_connection(info), "admin_token": tokens.admin, "controller": args.name})
    copies = f" x {args.replicas} copies" if args.replicas > 1 else ""
    print(f"memory service up: {len(specs)} table(s) on {args.shards} shard(s){copies}; directory {directory}; "
          f"checkpoints under {info['data_root']}")
    for spec in specs:
        print(describe_shard_memory(spec, args.shards, args.replicas))
    print(f"tokens (data and admin) and addresses saved to {_state_path()} (mode 600)")
    return 0


def _recorded_connection(info: dict[str, Any]) -> dict[str, Any]:
    """The controller's connection info as the state file records it (JSON)."""
    tls = info["tls"]
    return {"directory": info["directory"], "token": info["token"], "data_root": info["data_root"],
            "tls_ca_file": tls.ca_file if tls else None, "tls_cert_file": tls.cert_file if tls else None,
            "tls_key_file": tls.key_file if tls else None}


def _rotate_tokens(args) -> int:
    from memory_service.deploy import AccessTokens

    state = _read_state()
    recorded = state.get("controller") == args.name
    if not recorded and not (args.data_token and args.admin_token):
        raise ValueError(f"rotate-tokens: controller {args.name!r} is not the one `up` recorded in {_state_path()}, "
                         "so new tokens could not be saved; pass --data-token and --admin-token")
    generated = AccessTokens.generate()
    data, admin = args.data_token or generated.data, args.admin_token or generated.admin
    info = _ask(_controller(args).rotate_tokens.remote(data, admin, args.grace_s))
    print(f"tokens rotated on every server; the old ones stop working in {args.grace_s:.0f} s")
    if recorded:
        _write_state({**state, **_recorded_connection(info), "admin_token": admin})
        print(f"the new tokens are saved in {_state_path()}; give the data token to the jobs that use the service")
    return 0


def _controller(args):
    """The controller named by --name, once it answers (one that Ray restarts answers within seconds)."""
    from memory_service.deploy import get_controller

    _connect(args)
    return get_controller(args.name)


def _ask(call) -> Any:
    """The result of a controller call; a controller that died during it is one line, not a traceback."""
    import ray

    try:
        return ray.get(call)
    except ray.exceptions.RayActorError:
        raise ValueError("the memory controller died during this command; Ray restarts it from its last saved state: "
                         "check `engram memory status` and run the command again") from None


def _status(args) -> int:
    from memory_service.deploy import human_bytes

    controller = _controller(args)
    rows = _ask(controller.status.remote())
    header = ("shard", "group", "role", "state", "node", "address", "slots", "rows", "bytes", "reserved", "req/s",
              "p50 ms", "p99 ms", "pending", "aborted")
    table = [(str(r["shard"]), str(r["group"]), r["role"], r["state"], r["node"][:12], r["address"], str(r["slots"]),
              str(r["rows"]), human_bytes(r["bytes"]), human_bytes(r["reserved_bytes"]), f"{r['requests_per_s']:.1f}",
              f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", str(len(r["pending_steps"])), str(r["aborted_steps"]))
             for r in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *table)]
    for line in (header, *table):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    for r in rows:
        if r["unfilled_rows"]:
            print(f"shard {r['shard']}: {r['unfilled_rows']:,} rows still to get their initial values (in the "
                  f"background; a row looked up or updated first gets them at once)")
        for name, tier in r["tiers"].items():
            looked_up = tier["hits"] + tier["misses"]
            hits = f"{tier['hits'] / looked_up:.1%} of ids found in DRAM" if looked_up else "no ids looked up yet"
            print(f"shard {r['shard']}: table {name} tiered: {tier['cached_rows']:,} of {tier['capacity_rows']:,} "
                  f"rows cached in DRAM; {hits}; {tier['rows_read']:,} rows read from disk, "
                  f"{tier['written_back']:,} written back")
        for p in r["pending_steps"]:
            print(f"shard {r['shard']}: table {p['table']} step {p['step']} pending {p['age_s']:.1f} s, "
                  f"ranks {p['reported_ranks']} of {p['world_size']} reported")
    for event in _ask(controller.failovers.remote()):
        outcome = (f"shard {event['promoted']} promoted" if event["promoted"] is not None
                   else f"re-made from {event['remade_from']}" if "remade_from" in event else "its primary serves on")
        back = f"; all copies back after {event['recovered_s']:.1f} s" if "recovered_s" in event else ""
        print(f"failover: shard {event['shard']} ({event['was']} of group {event['group']}) died; {outcome}{back}"
              + (f"; {event['error']}" if "error" in event else ""))
    return 0


def _scale(args) -> int:
    moved = _ask(_controller(args).scale.remote(args.shards))
    print(f"scaled to {args.shards} shard(s); slots moved per table: {moved}")
    return 0


def _checkpoint(args) -> int:
    manifest = _ask(_controller(args).checkpoint.remote(args.directory, args.barrier_timeout_s))
    print(f"checkpoint written: {manifest}")
    return 0


def _restore(args) -> int:
    epoch = _ask(_controller(args).restore.remote(args.directory, args.shards, False, args.replicas))
    print(f"restored {args.directory} (routing epoch {epoch})")
    return 0


def _down(args) -> int:
    """Stop the service and the local head `up` started, whatever state they are in; forget the record."""
    from memory_service.deploy import stop_controller

    state = _read_state()
    if args.address or _recorded_cluster(state):
        try:
            _connect(args)
            stop_controller(args.name)
            print("memory service stopped")
        except ValueError as exc:  # no such controller, or the recorded cluster is gone
            print(f"nothing to stop: {exc}")
    else:
        print(f"nothing to stop: no running memory service recorded in {_state_path()}")
    if not args.address and _holder_alive(state):
        import ray

        ray.shutdown()
        os.kill(state["head_pid"], signal.SIGTERM)  # the holder started by `up` shuts its Ray head down
        print(f"stopped the local Ray head (holder pid {state['head_pid']})")
    _state_path().unlink(missing_ok=True)
    return 0


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers) -> None:
    """Add `memory` and its subcommands to the `engram` parser."""
    from memory_service.deploy import CONTROLLER_NAME

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="Ray cluster address (default: the local Ray head that `up` started)")
    common.add_argument("--ray-token", help="the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                        "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    common.add_argument("--name", default=CONTROLLER_NAME, help="controller actor name")
    tokens = argparse.ArgumentParser(add_help=False)
    tokens.add_argument("--data-token", help="the token for lookups and pushes, which jobs hold "
                        "(default: $ENGRAM_MEMORY_TOKEN, else generated)")
    tokens.add_argument("--admin-token", help="the token for everything else, which only the controller and "
                        "this CLI hold (default: $ENGRAM_MEMORY_ADMIN_TOKEN, else generated)")
    memory = subparsers.add_parser("memory", help="deploy and operate the memory service")
    commands = memory.add_subparsers(dest="memory_command", required=True, metavar="SUBCOMMAND")

    up = commands.add_parser("up", parents=[common, tokens], help="deploy the tables of a YAML file onto N shards")
    up.add_argument("--config", required=True, help="tables.yaml: `tables: [{name, rows, dim, ...}]`")
    up.add_argument("--shards", type=positive_int, default=2,
                    help="shard groups: each holds an even share of the slots")
    up.add_argument("--replicas", type=positive_int, default=1, help="shards per group, each holding all its slots: "
                    "a primary and replicas-1 copies on other shards (2 survives any one shard's death)")
    up.add_argument("--data-root", help="the folder (shared by the memory nodes) that checkpoints are written "
                    "under and restored from (default: $ENGRAM_DATA_ROOT, else ~/.engram/data)")
    up.add_argument("--tls-cert", help="PEM certificate chain for the servers (TLS on)")
    up.add_argument("--tls-key", help="PEM private key for --tls-cert")
    up.add_argument("--tls-client-ca", help="PEM CA that client certificates must chain to (mutual TLS on)")
    up.add_argument("--tls-ca", help="PEM CA that signed --tls-cert, for clients to check it "
                    "(default: --tls-client-ca, else --tls-cert itself)")
    up.add_argument("--tls-client-cert", help="under mutual TLS, the PEM certificate (signed by --tls-client-ca) "
                    "that the controller and the jobs it informs present (default: --tls-cert)")
    up.add_argument("--tls-client-key", help="PEM private key for --tls-client-cert")
    up.add_argument("--host", help="address the servers bind (default: each node's IP)")
    up.add_argument("--reflection", action="store_true", help="serve gRPC reflection (to token holders)")
    up.add_argument("--step-timeout-s", type=float, default=120.0,
                    help="abort a synchronous step whose ranks have not all pushed this long after its first push "
                         "(its partial sums dropped, its pushes refused from then on; 0: never)")
    up.add_argument("--shard-threads", type=int, default=0,
                    help="threads of each shard's optimizer and gathers (default 0: a quarter of its node's cores, "
                         "1 to 8)")
    up.add_argument("--tier-dir", help="the folder on each memory node (a local SSD) where tables with a `tier:` "
                    "keep their rows and optimizer state, a folder per table and shard (default: engram-tier under "
                    "the system's temporary folder)")
    up.set_defaults(func=_up)

    commands.add_parser("status", parents=[common], help="a table per shard").set_defaults(func=_status)
    scale = commands.add_parser("scale", parents=[common], help="move slots onto M shards, live")
    scale.add_argument("--shards", type=positive_int, required=True)
    scale.set_defaults(func=_scale)
    rotate = commands.add_parser("rotate-tokens", parents=[common],
                                 help="replace the data and admin tokens on every server, live")
    rotate.add_argument("--data-token", help="the new data token (default: generated)")
    rotate.add_argument("--admin-token", help="the new admin token (default: generated)")
    rotate.add_argument("--grace-s", type=float, default=60.0, help="how long the old tokens keep working")
    rotate.set_defaults(func=_rotate_tokens)
    save = commands.add_parser("checkpoint", parents=[common], help="write all tables to DIR (under the data root)")
    save.add_argument("directory")
    save.add_argument("--barrier-timeout-s", type=float, default=30.0,
                      help="how long to wait for pending synchronous steps to complete on every shard")
    save.set_defaults(func=_checkpoint)
    load = commands.add_parser("restore", parents=[common],
                               help="replace all tables by the checkpoint in DIR (under the data root)")
    load.add_argument("directory")
    load.add_argument("--shards", type=positive_int, help="shard count to restore onto (default: the current one)")
    load.add_argument("--replicas", type=positive_int, help="copies of each shard (default: the current count)")
    load.set_defaults(func=_restore)
    commands.add_parser("down", parents=[common], help="stop the shards, the controller and what `up` started"
                        ).set_defaults(func=_down)
