"""DistributedDataParallel over two CPU processes (gloo, launched by torchrun) gives the
single-process gradients."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_model
from torchrun_helpers import close_process_group, run_torchrun

import llm_adapters as la

CONFIGS = {
    "lora": lambda: la.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    "series": lambda: la.BottleneckConfig(bottleneck_size=8),
}


def _model(kind):
    model = la.get_adapter_model(tiny_model("llama", seed=3), CONFIGS[kind]())
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (4, 10), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}  # no padding: equal tokens per row


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(out):
    """The torchrun worker (this file run as a script): each rank's rows of the batch through
    DDP, one backward; rank 0 saves the gradients."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {}
        for kind in CONFIGS:
            model = _model(kind)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            batch = {k: v.chunk(world)[rank] for k, v in _batch().items()}
            ddp(**batch).loss.backward()
            results[kind] = _grads(model)
        if rank == 0:
            torch.save(results, os.path.join(out, "grads.pt"))
    finally:
        close_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    run_torchrun(__file__, tmp_path)
    results = torch.load(tmp_path / "grads.pt")
    for kind in CONFIGS:
        model = _model(kind)
        model(**_batch()).loss.backward()
        single, distributed = _grads(model), results[kind]
        assert distributed.keys() == single.keys() and single
        for name, grad in single.items():
            torch.testing.assert_close(distributed[name], grad, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    _worker(sys.argv[1])
