"""Greedy generation on remote serving tables gives the tokens of in-process tables holding the same rows
(bench.generate's pairing: bfloat16 rows on the shards and on the wire, the same rows rounded in process), the
rows read out of the co-located shards' shared memory."""
from __future__ import annotations

import pytest
import torch

from bench.generate import serving_runtimes
from compute.generate import Generator
from tests.integration.tiny_runs import tiny_run


ON_THE_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA GPU")])


@pytest.mark.ray
@pytest.mark.parametrize("device", ["cpu", ON_THE_GPU])
def test_remote_serving_rows_generate_the_tokens_of_in_process_tables(ray_cluster, tmp_path, device):
    """On a GPU the rows read on the calling thread are copied to it on that thread's stream."""
    local, remote, handle = serving_runtimes(tiny_run(tmp_path), torch.device(device), shards=2)
    try:
        prompts = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12], [120]]
        generated = [Generator(runtime.model, runtime.compressor, runtime.hasher).generate_ids(
            prompts, 10, stop_at_eos=False) for runtime in (local, remote)]
        # The shards are on this machine: their serving rows were read out of their shared memory, none asked for.
        moved = remote.client.moved()
        assert moved["read_shared"]["rows"] > 0 and "lookup" not in moved
        # The rows did reach the model: generating without them changes the tokens.
        for table in local.tables.values():
            torch.nn.init.zeros_(table.weight)
        without_rows = Generator(local.model, local.compressor, local.hasher).generate_ids(prompts, 10,
                                                                                           stop_at_eos=False)
    finally:
        local.close()
        remote.close()
        handle.stop()
    assert generated[0] == generated[1]
    assert all(len(row) == 10 for row in generated[1])
    assert without_rows != generated[0]
