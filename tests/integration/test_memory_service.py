"""Integration: real shard actors and gRPC servers on a local Ray, driven through MemoryClient."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from compute.memory.client import MemoryClient
from protos.wire import quantize_rows
from protos import engram_memory_v1_pb2 as pb
from tests.integration.memory_deploy import TOKEN, deployment, reference_rows, shard_stub, spec

pytestmark = pytest.mark.ray

ADAM = spec("adam", kind="adam", lr=0.01)
SGD = spec("sgd", kind="sgd", lr=0.5)
SYNC_TWO = spec("sync_two", kind="adam", seed=3)
SYNC_ONE = spec("sync_one", kind="adam", seed=3)
SERVING = spec("serving", storage_dtype="bfloat16", dim=8)
SGD_BF16_GRADS = spec("sgd_bf16_grads", kind="sgd", lr=0.5)
SPLIT_PARTS = spec("split_parts", kind="adam", seed=7)
SPLIT_WHOLE = spec("split_whole", kind="adam", seed=7)
PUSH_PULL = spec("push_pull", kind="adam", seed=5)


@pytest.fixture(scope="module")
def memory(ray_cluster):
    tables = [ADAM, SGD, SYNC_TWO, SYNC_ONE, SERVING, SGD_BF16_GRADS, SPLIT_PARTS, SPLIT_WHOLE, PUSH_PULL]
    with deployment(tables, shards=2) as (controller, client):
        yield controller, client


def test_lookup_equals_reference_rows_in_caller_order(memory):
    _, client = memory
    ids = np.random.default_rng(0).integers(0, ADAM.rows, size=3000)  # duplicates, any order
    expected = reference_rows(ADAM, ids)
    torch.testing.assert_close(client.lookup("adam", ids, dtype=torch.float32).result(), expected, rtol=0, atol=0)
    assert torch.equal(client.lookup("adam", ids, dtype=torch.bfloat16).result(), expected.bfloat16())
    assert torch.equal(client.lookup("adam", ids, dtype=torch.float16).result(), expected.half())
    served = client.lookup("serving", ids[:100], dtype=torch.float32).result()
    assert torch.equal(served, reference_rows(SERVING, ids[:100]).bfloat16().float())
    # FP8: E4M3 values and each row's scale, as the shard quantised them; read-only bfloat16 tables too.
    assert torch.equal(client.lookup("adam", ids, dtype=torch.float8_e4m3fn).result(), quantize_rows(expected))
    assert torch.equal(client.lookup("serving", ids[:100], dtype=torch.float8_e4m3fn).result(),
                       quantize_rows(reference_rows(SERVING, ids[:100]).bfloat16()))


def test_adam_updates_equal_torch_adam(memory):
    _, client = memory
    ids = np.array([5, 64 + 5, 130, 9999, 777, 1], dtype=np.int64)  # rows on both shards
    param = torch.nn.Parameter(reference_rows(ADAM, ids).clone())
    reference = torch.optim.Adam([param], lr=ADAM.optimizer.lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = torch.randn(len(ids), ADAM.dim, generator=gen)
        param.grad = grads.clone()
        reference.step()
        client.push("adam", ids, grads, step=step, synchronous=False).result()
    torch.testing.assert_close(client.lookup("adam", ids, dtype=torch.float32).result(), param.detach())


def test_sgd_updates_equal_torch_sgd_and_untouched_rows_stay(memory):
    _, client = memory
    ids = np.arange(0, 200, 3, dtype=np.int64)
    param = torch.nn.Parameter(reference_rows(SGD, ids).clone())
    reference = torch.optim.SGD([param], lr=SGD.optimizer.lr)
    grads = torch.randn(len(ids), SGD.dim, generator=torch.Generator().manual_seed(2))
    param.grad = grads.clone()
    reference.step()
    result = client.push("sgd", ids, grads, step=0, synchronous=True).result()
    assert result.applied_rows == len(ids) and not result.pending
    torch.testing.assert_close(client.lookup("sgd", ids, dtype=torch.float32).result(), param.detach())
    untouched = np.arange(1, 200, 3)
    assert torch.equal(client.lookup("sgd", untouched, dtype=torch.float32).result(), reference_rows(SGD, untouched))


def test_bfloat16_gradients_apply_as_their_float32_values(memory):
    _, client = memory
    ids = np.arange(10, 300, 7, dtype=np.int64)
    grads = torch.randn(len(ids), SGD_BF16_GRADS.dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    client.push("sgd_bf16_grads", ids, grads, step=0).result()
    expected = reference_rows(SGD_BF16_GRADS, ids) - SGD_BF16_GRADS.optimizer.lr * grads.float()
    torch.testing.assert_close(client.lookup("sgd_bf16_grads", ids, dtype=torch.float32).result(), expected)


def test_two_ranks_pushing_halves_equal_one_rank_pushing_the_whole(memory):
    _, client = memory
    ids = np.random.default_rng(3).choice(SYNC_ONE.rows, size=400, replace=False)
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        half_a, half_b = torch.randn(2, len(ids), SYNC_ONE.dim, generator=gen)
        first = client.push("sync_two", ids[:300], half_a[:300], step=step, rank=0, world_size=2).result()
        assert first.pending and first.applied_rows == 0
        whole = torch.zeros(len(ids), SYNC_ONE.dim)
        whole[:300] += half_a[:300]
        whole[100:] += half_b[100:]  # rows 100..299 get gradients from both ranks
        client.push("sync_two", ids[100:], half_b[100:], step=step, rank=1, world_size=2).result()
        client.push("sync_one", ids, whole, step=step, rank=0, world_size=1).result()
    two = client.lookup("sync_two", ids, dtype=torch.float32).result()
    one = client.lookup("sync_one", ids, dtype=torch.float32).result()
    assert torch.equal(two, one)
    assert not torch.equal(one, reference_rows(SYNC_ONE, ids))


def test_a_push_split_into_many_requests_applies_as_one(memory):
    """Adam steps once per synchronous step however many requests a rank's push takes: a shard counts
    the rank as reported only with its last part, which the client sends after the others."""
    _, client = memory
    ids = np.sort(np.random.default_rng(6).choice(SPLIT_PARTS.rows, size=500, replace=False))
    gen = torch.Generator().manual_seed(8)
    with MemoryClient(client.directory, TOKEN, max_rows_per_request=40) as splitting:
        for step in range(3):
            rank_0, rank_1 = torch.randn(2, len(ids), SPLIT_PARTS.dim, generator=gen)
            first = splitting.push("split_parts", ids, rank_0, step=step, rank=0, world_size=2).result()
            assert first.pending and first.applied_rows == 0  # ~6 requests a shard, none applied yet
            splitting.push("split_parts", ids, rank_1, step=step, rank=1, world_size=2).result()
            client.push("split_whole", ids, rank_0 + rank_1, step=step).result()
    parts = client.lookup("split_parts", ids, dtype=torch.float32).result()
    whole = client.lookup("split_whole", ids, dtype=torch.float32).result()
    assert torch.equal(parts, whole)
    assert not torch.equal(whole, reference_rows(SPLIT_WHOLE, ids))


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_retried_push_is_applied_once(memory, synchronous):
    controller, client = memory
    ids = np.arange(5000, 5100, dtype=np.int64)
    grads = torch.ones(len(ids), SGD.dim)
    step = 100 + int(synchronous)
    before = client.lookup("sgd", ids, dtype=torch.float32).result()
    assert not client.push("sgd", ids, grads, step=step, synchronous=synchronous).result().duplicate
    once = client.lookup("sgd", ids, dtype=torch.float32).result()
    checksums = ray.get(controller.checksums.remote())["sgd"]
    assert client.push("sgd", ids, grads, step=step, synchronous=synchronous).result().duplicate
    assert ray.get(controller.checksums.remote())["sgd"] == checksums
    torch.testing.assert_close(once, before - SGD.optimizer.lr * grads)


@pytest.mark.parametrize("synchronous", [True, False])
def test_a_push_pulls_its_rows_as_they_are_once_it_is_applied(memory, synchronous):
    """Push-and-pull: rows the push changes and rows it does not, on both shards, come back as a lookup
    made after the push would see them; pulled with the step's last message (or looked up after an
    asynchronous push)."""
    _, client = memory
    ids = np.arange(0, 400, 2, dtype=np.int64)
    pull = np.arange(100, 700, 3, dtype=np.int64)  # overlaps the pushed rows
    step = 10 + int(synchronous)
    grads = torch.randn(len(ids), PUSH_PULL.dim, generator=torch.Generator().manual_seed(step))
    result = client.push("push_pull", ids, grads, step=step, synchronous=synchronous, pull_ids=pull,
                         pull_dtype=torch.float32).result()
    after = client.lookup("push_pull", pull, dtype=torch.float32).result()
    assert torch.equal(result.pulled, after)
    changed = np.isin(pull, ids)
    assert changed.any() and not torch.equal(after[changed], reference_rows(PUSH_PULL, pull[changed]))
    assert torch.equal(after[~changed], reference_rows(PUSH_PULL, pull[~changed]))
    # Pulled in float8_e4m3 as a lookup holds them: E4M3 bytes and a scale per row.
    result = client.push("push_pull", ids, grads, step=step + 2, synchronous=synchronous, pull_ids=pull,
                         pull_dtype=torch.float8_e4m3fn).result()
    assert torch.equal(result.pulled, client.lookup("push_pull", pull, dtype=torch.float8_e4m3fn).result())
    with pytest.raises(ValueError, match="pull_ids"):
        client.push("push_pull", ids, grads, step=step + 4, pull_ids=pull[::-1])


def test_a_shard_answers_pulled_rows_only_once_the_step_is_applied(memory):
    """The protocol under the client: the report that completes a synchronous step gets the pulled rows in its
    reply; a report the step still waits on (another rank's push missing) gets none."""
    _, client = memory
    stub, channel = shard_stub(client, 0)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    owned = np.array([row for row in range(0, 4000) if client.slot_owners()[1]["push_pull"][row % 64] == 0][:50])
    grads = np.full((len(owned), PUSH_PULL.dim), 0.5, dtype="<f4")

    def report(rank: int) -> pb.UpdateResponse:
        return stub.Update(pb.UpdateRequest(table="push_pull", row_ids=owned.tobytes(), grads=grads.tobytes(),
                                            grad_dtype=pb.FLOAT32, step=50, rank=rank, world_size=2,
                                            synchronous=True, pull_row_ids=owned.tobytes(), pull_dtype=pb.FLOAT32),
                           metadata=auth)

    try:
        first = report(0)
        assert first.pending and not first.pulled and not first.pulled_rows
        last = report(1)
        assert not last.pending and last.pulled
    finally:
        channel.close()
    pulled = torch.frombuffer(bytearray(last.pulled_rows), dtype=torch.float32).view(len(owned), PUSH_PULL.dim)
    assert torch.equal(pulled, client.lookup("push_pull", owned, dtype=torch.float32).result())
    assert not torch.equal(pulled, reference_rows(PUSH_PULL, owned))
