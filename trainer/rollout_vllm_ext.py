"""Methods grafted onto vLLM's worker (``LLM(worker_extension_cls=...)``) for the per-step weight sync.

This module runs **inside vLLM's worker process** (multiprocessing engine), so it imports nothing of the trainer and
nothing heavy at import time. The trainer reaches these methods with ``llm.collective_rpc(name, args=...)``.

Why a file and not tensors: vLLM's RPC serializes untyped arguments with msgpack, which turns a nested tensor into a
list (``'list' object has no attribute 'dtype'``). A safetensors file in ``/dev/shm`` (RAM) is the measured fastest
route on CPU (vllm-notes.md Q2). Why ``reload_weights`` and never ``model.load_weights``: vLLM's CPU backend repacks
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
