"""A local Ray head that outlives `engram memory up`: this process holds it until SIGTERM/SIGINT.

Run by the CLI when no cluster exists; prints the cluster's GCS address on its first line.
"""
from __future__ import annotations

import argparse
import os
import signal

import ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--shard-slots", type=int, default=64, help="engram_memory resource of this node")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             resources={"engram_memory": args.shard_slots}, logging_level="ERROR")
    print(ray.get_runtime_context().gcs_address, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    ray.shutdown()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
