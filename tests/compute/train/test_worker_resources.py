"""Where Ray Train workers go: compute nodes when the cluster has them, anywhere on the embedded Ray."""
from __future__ import annotations

from compute.train.job import COMPUTE_RESOURCE, worker_resources

HEAD = {"CPU": 1.0, "memory": 1e9}
MEMORY_NODE = {"CPU": 4.0, "engram_memory": 2.0, "memory": 6e10}


def test_a_cluster_with_compute_nodes_puts_one_worker_on_each_compute_slot():
    gpu_node = {"CPU": 16.0, "GPU": 4.0, COMPUTE_RESOURCE: 4.0}
    resources = worker_resources([HEAD, MEMORY_NODE, gpu_node, gpu_node], num_workers=8, use_gpu=True)
    assert resources == {"CPU": 4, COMPUTE_RESOURCE: 1}  # 16 cores / 4 slots; only compute nodes have the unit


def test_each_worker_takes_the_cores_of_the_smallest_compute_slot_and_at_least_one():
    small, big = {"CPU": 1.0, COMPUTE_RESOURCE: 1.0}, {"CPU": 8.0, COMPUTE_RESOURCE: 2.0}
    assert worker_resources([HEAD, small, big], num_workers=2, use_gpu=False) == {"CPU": 1, COMPUTE_RESOURCE: 1}
    crowded = {"CPU": 2.0, COMPUTE_RESOURCE: 8.0}
    assert worker_resources([crowded], num_workers=8, use_gpu=True) == {"CPU": 1, COMPUTE_RESOURCE: 1}


def test_the_embedded_ray_without_compute_nodes_asks_nothing_extra():
    laptop = {"CPU": 8.0, "engram_memory": 8.0, "memory": 1e10}
    assert worker_resources([laptop], num_workers=2, use_gpu=False) == {"CPU": 4}  # the cores shared
    assert worker_resources([laptop], num_workers=3, use_gpu=True) == {"CPU": 1}
    assert worker_resources([{"CPU": 1.0}], num_workers=4, use_gpu=False) == {"CPU": 1}


def test_a_node_with_no_compute_units_left_in_its_advertisement_does_not_count():
    assert COMPUTE_RESOURCE not in worker_resources([HEAD, {"CPU": 2.0, COMPUTE_RESOURCE: 0.0}], 1, False)
