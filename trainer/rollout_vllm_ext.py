"""Methods grafted onto vLLM's worker (``LLM(worker_extension_cls=...)``) for the per-step weight sync.

This module runs **inside vLLM's worker process** (multiprocessing engine), so it imports nothing of the trainer and
nothing heavy at import time. The trainer reaches these methods with ``llm.collective_rpc(name, args=...)``.

Why shared memory and not tensors: vLLM's RPC serializes untyped arguments with msgpack, which turns a nested tensor
into a list (``'list' object has no attribute 'dtype'``). The trainer copies the weights into one file in
``/dev/shm`` that both processes map (``torch.from_file(shared=True)``) and sends only the layout (names, dtypes,
shapes, byte offsets); the worker reads the tensors as views of its own mapping, so nothing is serialized or read
through a file API (:meth:`WeightSyncExtension.oprd_reload_from_shm`). :meth:`~WeightSyncExtension.oprd_reload_from_file`
(a safetensors file, the earlier route) is kept for comparison in ``bench step``. Why ``reload_weights`` and never ``model.load_weights``: vLLM's CPU backend repacks
every linear layer after loading and drops the parameters' ``weight_loader``; the layerwise reload restores the
loaders, loads, and repacks again.
"""

from __future__ import annotations

__all__ = ["WeightSyncExtension"]


class WeightSyncExtension:
    """Mixed into vLLM's ``Worker``; ``self`` is the worker (it has ``reload_weights`` and ``model_runner``)."""

    def oprd_reload_from_file(self, path: str) -> int:
        """Load the full state dict (checkpoint names, ``lm_head.weight`` included for tied models) from the
        safetensors file ``path`` in place; returns the number of tensors read."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)

    def oprd_reload_from_shm(self, path: str, size: int, layout: list) -> int:
        """Reload in place from the shared mapping ``path`` of ``size`` bytes that the trainer wrote: ``layout`` is
        ``[[name, dtype, shape, offset], ...]`` (dtype as ``"float32"``, offset in bytes, 64-byte aligned), the
        full state dict in checkpoint names. The mapping is opened once per path and kept (views, no copies);
        returns the number of tensors."""
        import torch

        cache = self.__dict__.setdefault("_oprd_shm", {})
        buf = cache.get(path)
        if buf is None or buf.numel() != size:
            cache.clear()  # a new layout comes in a new file: drop the old mapping
            buf = cache[path] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        weights = []
        for name, dtype, shape, offset in layout:
            dt = getattr(torch, dtype)
            n = dt.itemsize
            for d in shape:
                n *= d
            weights.append((name, buf[offset : offset + n].view(dt).view(shape)))
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)

    def oprd_reload_from_ipc(self, payload: bytes) -> int:
        """CUDA only, UNTESTED until ``scripts/gpu-check.sh`` runs on a GPU: rebuild each tensor from the CUDA IPC
        handle the trainer made with ``torch.multiprocessing.reductions.reduce_tensor`` (same GPU, no copy through
        host memory) and reload in place. ``payload`` is the pickled dict name -> ``(rebuild_fn, args)`` (pickled by
        the trainer because vLLM's RPC msgpack-encodes arguments); the device index in ``args`` is replaced by
        this worker's device (the trainer and the engine share one physical GPU)."""
        import pickle

        import torch

        handles = pickle.loads(payload)

        device = torch.accelerator.current_device_index()
        weights = []
        for name, (rebuild, args) in handles.items():
            args = list(args)
            args[6] = device  # reduce_tensor's rebuild_cuda_tensor args: index 6 is the storage device
            weights.append((name, rebuild(*args)))
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return len(weights)
