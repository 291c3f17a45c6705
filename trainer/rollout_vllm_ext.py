"""Methods grafted onto vLLM's worker (``LLM(worker_extension_cls=...)``) for the per-step weight sync.

This module runs **inside vLLM's worker process** (multiprocessing engine), so it imports nothing of the trainer and
nothing heavy at import time. The trainer reaches these methods with ``llm.collective_rpc(name, args=...)``.

Why shared memory and not tensors: vLLM's RPC serializes untyped arguments with msgpack, which turns a nested tensor
into a list (``'list' object has no attribute 'dtype'``). The trainer copies the weights into one file in
``/dev/shm`` that both processes map (``torch.from_file(shared=True)``) and sends only the layout (names, dtypes,
shapes, byte offsets); the worker reads the tensors as views of its own mapping, so nothing is serialized or read
through a file API (:meth:`WeightSyncExtension.oprd_reload_from_shm`). :meth:`~WeightSyncExtension.oprd_reload_from_file`
(a safetensors file, the earlier route) is kept for comparison in ``bench step``.

Two ways to apply the weights once they are in the worker (``sync_route`` of :class:`trainer.rollout_vllm.VLLMEngine`):

* ``direct`` (CPU default, :meth:`WeightSyncExtension.oprd_load_direct`): the model's own ``load_weights`` (vLLM's
  checkpoint-name mapping and per-parameter loaders: q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) copies
  into the live parameters, then each layer's ``quant_method.process_weights_after_loading`` re-packs it once.
  vLLM's CPU backend drops a linear layer's unpacked weight after packing it into a oneDNN handler; the first
  direct sync restores that weight (from vLLM's own reload metadata, loaders included) and keeps it, so later syncs
  are plain copies plus one re-pack per layer. The input embedding is not re-packed: vLLM packs it as a GEMM too
  (in case it is also the head) although a lookup never uses that. Measured quiet at the step-bench shape (tied
  151936 x 192 embedding, in-process): 0.11-0.12 s against the layerwise reload's 0.34 s, which materializes every
  layer anew, copies every tensor twice more and packs the tied matrix twice (``embed_tokens`` and ``lm_head``).
  Memory: the kept unpacked weights of the linear layers (the embedding and head are never dropped by vLLM).
* ``reload``: vLLM's layerwise ``Worker.reload_weights(is_checkpoint_format=True)`` (restore on meta, materialize,
  load, process, copy back into the original storage). Kept for CUDA (where the copy back keeps CUDA-graph
  references valid) and for comparison. ``model.load_weights`` alone is never enough on CPU: the packed handlers
  would keep serving the old weights.
"""

from __future__ import annotations

__all__ = ["WeightSyncExtension"]


def _shm_views(buf, layout: list) -> list:
    """``[(name, tensor)]`` views of the shared mapping ``buf`` (uint8) for ``layout`` ``[[name, dtype, shape,
    offset], ...]`` (dtype as ``"float32"``, offset in bytes)."""
    import torch

    weights = []
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        n = dt.itemsize
        for d in shape:
            n *= d
        weights.append((name, buf[offset : offset + n].view(dt).view(shape)))
    return weights


class _DirectPlan:
    """What :meth:`WeightSyncExtension.oprd_load_direct` re-processes after each load: the layers with an
    unquantized CPU GEMM (``layers``, each once even when tied), the unpacked weights vLLM dropped and the sync keeps
    (``kept``: ``(layer, parameter)``), and the parameter names a complete load must cover (``names``)."""

    def __init__(self, layers: list, kept: list, names: set) -> None:
        self.layers, self.kept, self.names = layers, kept, names


def _direct_plan(model) -> _DirectPlan:
    """Restore the unpacked weights of ``model``'s packed linear layers (shapes, dtypes and ``weight_loader`` from
    vLLM's reload metadata) and list what a direct sync re-processes. Raises ``NotImplementedError`` for a model the
    direct route does not cover (quantized layers): the engine then syncs with ``reload``."""
    import torch.nn.functional as F
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_layer, restore_layer_on_meta

    # Modules that compute logits: every ParallelLMHead, and an embedding registered as ``lm_head`` too (a model
    # that ties by sharing the module itself).
    heads = {
        id(m) for n, m in model.named_modules(remove_duplicate=False) if n.rpartition(".")[2] == "lm_head"
    }
    layers, kept = [], []
    for name, layer in model.named_modules():  # named_modules visits a shared module once
        qm = getattr(layer, "quant_method", None)
        if (
            isinstance(qm, UnquantizedEmbeddingMethod)
            and not isinstance(layer, ParallelLMHead)
            and id(layer) not in heads
        ):
            # An input embedding only looks rows up; vLLM's CPU backend still packs it as a GEMM (for the case it
            # is also the head). Re-packing it each sync would cost as much as the head itself (151936 x hidden):
            # any GEMM on it reads the live weight instead (correct if ever called, free if not).
            layer.cpu_linear = F.linear
            continue
        if isinstance(qm, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
            layers.append(layer)
            if layer.weight.numel() == 0:  # packed into a oneDNN/sgl handler, the weight itself dropped
                info = get_layerwise_info(layer)
                if "weight" not in info.restore_metadata[0]:
                    raise NotImplementedError(f"{name}: no reload metadata for its weight")
                dropped = layer.weight
                restore_layer_on_meta(layer, info)
                materialize_layer(layer, info)
                kept.append((layer, layer.weight))
                # As vLLM left it until the first direct load (``reload`` expects that).
                layer.weight = dropped
        elif isinstance(qm, QuantizeMethodBase) and any(True for _ in layer.parameters(recurse=False)):
            raise NotImplementedError(
                f"{name}: {type(qm).__name__} (the direct sync covers unquantized layers)"
            )
    names = {n for n, _ in model.named_parameters()}
    return _DirectPlan(layers, kept, names)


class WeightSyncExtension:
    """Mixed into vLLM's ``Worker``; ``self`` is the worker (it has ``reload_weights`` and ``model_runner``)."""

    def oprd_prepare_direct(self) -> str:
        """Prepare the ``direct`` route (restore the dropped unpacked weights; the packed handlers keep serving
        until the first :meth:`oprd_load_direct`). Returns ``""`` when the model is covered, else the reason."""
        try:
            self.__dict__["_oprd_direct"] = _direct_plan(self.model_runner.get_model())
        except NotImplementedError as exc:
            return str(exc)
        return ""

    def oprd_load_direct(self, weights) -> int:
        """Load ``weights`` (``[(checkpoint name, tensor)]``, the full state dict; a tied ``lm_head.weight`` may be
        listed, vLLM skips it) in place through the model's own ``load_weights`` and re-pack each CPU GEMM once (see
        the module docstring). Returns the number of parameters loaded; raises ``RuntimeError`` naming parameters
        the weights did not cover (the engine would otherwise sample from a mix of old and new weights)."""
        model = self.model_runner.get_model()
        plan = self.__dict__.get("_oprd_direct")
        if plan is None:
            plan = self.__dict__["_oprd_direct"] = _direct_plan(model)
        for layer, weight in plan.kept:  # process_weights_after_loading dropped it again after packing
            layer.weight = weight
        loaded = set(model.load_weights(iter(weights)) or ())
        missing = plan.names - loaded
        if missing:
            raise RuntimeError(
                f"weight sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}"
            )
        for layer in plan.layers:
            layer.quant_method.process_weights_after_loading(layer)
        return len(loaded)

    def oprd_load_direct_from_shm(self, path: str, size: int, layout: list) -> int:
        """:meth:`oprd_load_direct` from the shared mapping ``path`` (see :meth:`oprd_reload_from_shm`)."""
        return self.oprd_load_direct(_shm_views(self._oprd_mapping(path, size), layout))

    def _oprd_mapping(self, path: str, size: int):
        import torch

        cache = self.__dict__.setdefault("_oprd_shm", {})
        buf = cache.get(path)
        if buf is None or buf.numel() != size:
            cache.clear()  # a new layout comes in a new file: drop the old mapping
            buf = cache[path] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        return buf

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
        weights = _shm_views(self._oprd_mapping(path, size), layout)
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
