"""offload's store (issue 10): the memory report counts the capacity really allocated, and the
file store takes K/V that live on a GPU (copied to host memory before writing)."""

import os

import pytest
import torch

import kvbound
from conftest import prompt_ids, run_greedy, tiny

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("store", ["file", "host"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_report_counts_allocated_capacity(name, store):
    model = tiny(name)
    cache = kvbound.make_cache(model, "offload", 3, store=store)
    run_greedy(model, prompt_ids(30), cache, 40)  # 70 tokens: append-only stores grew past 64 records
    grew = False
    for layer in cache.layers:
        tiers = layer.tiers()
        if store == "file":
            real = os.path.getsize(layer.store.path) if os.path.exists(layer.store.path) else 0
        else:
            real = 0 if layer.store.host is None else layer.store.host.numel() * layer.store.host.element_size()
        assert tiers["offloaded"] + tiers["offload_slack"] == real
        assert tiers["offloaded"] == layer.store.nbytes()
        grew |= tiers["offload_slack"] > 0
    assert grew  # the geometric growth really left unused capacity, and it is reported
    report = cache.memory_report()
    assert report["total_bytes"] == sum(report["bytes_by_tier"].values())
    assert report["bytes_by_tier"]["offload_slack"] > 0
    cache.close()


class FakeCuda(torch.Tensor):
    """A CPU tensor that behaves like a CUDA one where it matters here: ``device`` says cuda and
    ``numpy()`` refuses, as torch does for CUDA tensors; an explicit copy to the CPU is a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        wants_cpu = func in (torch.Tensor.cpu, torch.Tensor.to) and "cpu" in [str(a) for a in (*args[1:], *kwargs.values())]
        if wants_cpu or not isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor).clone() if isinstance(out, torch.Tensor) else out
        return out.as_subclass(cls)

    @property
    def device(self):
        return torch.device("cuda", 0)

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")


def test_file_store_takes_gpu_tensors():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "offload", 2, store="file")
    store = cache.layers[0].store
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="cuda"):  # the fake really behaves like a CUDA tensor
        k.as_subclass(FakeCuda).numpy()
    store.write(0, k.as_subclass(FakeCuda), v.as_subclass(FakeCuda))
    rk, rv = store.read(0, 5, k)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    cache.close()
