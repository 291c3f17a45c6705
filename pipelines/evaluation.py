"""The evaluate stage's library: sample k responses per problem, grade them, and summarize per (suite, role).

Flow for one model directory (:func:`evaluate_model`):

1. Load the tokenizer (``trainer.models.load_tokenizer``: stock ``AutoTokenizer``, refused if it disagrees with
   ``tokenizer.json``) and the engine ``evaluate.engine`` names: ``hf`` loads
   ``AutoModelForCausalLM.from_pretrained(dir, use_safetensors=True)`` (fp32, eval mode) for
   :class:`trainer.rollout.HFGenerateEngine`; ``vllm`` starts one :class:`trainer.rollout_vllm.VLLMEngine` on the
   directory (fp32, ``evaluate.vllm``), closed when the model is done.
2. For each suite (:mod:`pipelines.suites`): encode every prompt (:func:`encode_prompt`), then, in chunks of
   ``evaluate.batch_size`` prompts, sample ``evaluate.k`` responses each with that engine (``temperature == 0`` is
   greedy). Both engines share the sampling protocol of :mod:`trainer.rollout`: one ``generate`` call per chunk
   after ``torch.manual_seed(evaluate.seed)`` per suite, the ``k`` rows of a prompt contiguous, first EOS kept;
   greedy outputs are token-for-token equal (tested), sampled ones differ (each engine has its own sampler).
3. Grade each chunk's responses with the problem's grader (:func:`grade_responses`: ``pipelines.graders.grade_many``
   per grader, so costly graders such as ``code_tests`` grade in parallel) and compute the metrics of
   :mod:`pipelines.eval_metrics`.

Determinism: the global torch RNG is seeded with ``evaluate.seed`` before each suite, so a suite's samples do not
depend on which suites ran before it; the bootstrap CI uses the same seed. Same weights, config and hardware give
the same numbers.

Outputs (:func:`write_eval_outputs`, docs/contracts.md): ``metrics/eval.json`` ``{suite: {role: metrics}}``,
``artifacts/eval/per_problem.jsonl`` (one row per problem and role, for paired comparisons) and
``artifacts/eval/responses.jsonl`` (the decoded responses with their grader, grades, reasons and lengths). What an
evaluation is comparable by (suite digest, grader names and versions) is :func:`pipelines.suites.suite_record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipelines.eval_metrics import (
    avg_at_k,
    best_at_k,
    bootstrap_ci,
    distinct_4gram_ratio,
    length_stats,
    pass_at_k,
)
from pipelines.graders import DEFAULT_GRADER, GradeResult, grade_many
from pipelines.stage_io import atomic_write_text
from pipelines.suites import EvalProblem, LoadedSuite, load_suite
from trainer.config import EvalSuite, EvaluateConfig
from trainer.models import load_tokenizer
from trainer.rollout import HFGenerateEngine, RolloutEngine

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig

__all__ = [
    "METRIC_KEYS",
    "ROLES",
    "ProblemResult",
    "ServedModel",
    "encode_prompt",
    "evaluate_loaded",
    "evaluate_model",
    "evaluate_suite",
    "grade_responses",
    "prompt_suffix_for",
    "special_token_ids",
    "start_vllm",
    "summarize",
    "with_suffix",
    "write_eval_outputs",
]

ROLES = ("teacher", "student_base", "student", "student_final", "champion")
"""``champion``: the registry's champion, scored on the failure bank's regression suites (pipelines/failures_stages.py)."""
METRIC_KEYS = (
    "avg_at_k",
    "pass_at_k",
    "best_at_k",
    "avg_at_k_ci95",
    "mean_length",
    "median_length",
    "p95_length",
    "dist_4g",
    "n_problems",
    "k",
)


RESPONSE_KEYS = ("suite", "role", "problem_id", "grader", "responses", "correct", "reasons", "lengths")
"""Keys of an ``artifacts/eval/responses.jsonl`` row."""


@dataclass(frozen=True)
class ProblemResult:
    """Everything sampled for one problem by one model: ``k`` responses, their grades and token lengths."""

    suite: str
    role: str
    problem_id: str
    k: int
    n_correct: int
    mean_length: float
    """Mean response length in tokens (EOS included)."""
    responses: list[str]
    correct: list[bool]
    lengths: list[int]
    grader: str = DEFAULT_GRADER
    reasons: list[str] | None = None
    """Why each response is not correct (``""`` when it is), from the grader."""

    def contract_row(self) -> dict[str, Any]:
        """The ``per_problem.jsonl`` row of docs/contracts.md."""
        return {
            "suite": self.suite,
            "role": self.role,
            "problem_id": self.problem_id,
            "k": self.k,
            "n_correct": self.n_correct,
            "mean_length": self.mean_length,
        }


@dataclass(frozen=True)
class ServedModel:
    """What the evaluator reads of a model whose weights an engine holds itself (vLLM): its ``config``
    (``max_position_embeddings``) and ``generation_config`` (EOS ids). Passed where a ``PreTrainedModel`` goes;
    the engine's ``generate`` ignores its ``model`` argument."""

    config: PretrainedConfig
    generation_config: GenerationConfig

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ServedModel:
        """``config.json`` and ``generation_config.json`` of ``model_dir`` (the latter derived from the config when
        absent), exactly what ``AutoModelForCausalLM.from_pretrained`` would attach to the model."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(model_dir)
        try:
            gen = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json
            gen = GenerationConfig.from_model_config(config)
        return cls(config=config, generation_config=gen)


# ------------------------------------------------------------------------------------------------ encoding
def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of one prompt.

    ``chat=True`` and a tokenizer with a chat template: one user turn, ``add_generation_prompt=True`` and
    ``enable_thinking=False`` (the paper's setting; templates without that switch ignore it). Otherwise the text as-is,
    preceded by BOS when the tokenizer defines one: this is exactly ``tokenizer(prompt)`` of the embedded task
    (``pipelines.task``), which the teacher and student were trained on.
    """
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        # The template already wrote any BOS it wants; do not let the tokenizer add another one.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def with_suffix(prompt: str, suffix: str) -> str:
    """``prompt + suffix`` unless ``suffix`` is empty or the prompt already ends with it (ignoring surrounding
    whitespace): the offline reference appends the instruction unconditionally, so AIMO, whose prompts already
    carry it, got it twice (oprd-method.md section 7)."""
    if not suffix.strip() or prompt.rstrip().endswith(suffix.strip()):
        return prompt
    return prompt + suffix


def prompt_suffix_for(suite: LoadedSuite, problem: EvalProblem, default: str) -> str:
    """The suffix appended to ``problem``'s prompt: the suite's own ``prompt_suffix`` when set; otherwise
    ``default`` (``evaluate.prompt_suffix``, a ``\\boxed{}`` instruction) for ``math`` rows of a file suite, and
    nothing for the embedded suite or rows of other graders (their prompts say what answer format they want)."""
    if suite.prompt_suffix is not None:
        return suite.prompt_suffix
    return "" if suite.embedded or problem.grader != DEFAULT_GRADER else default


def grade_responses(
    items: Sequence[tuple[EvalProblem, str]], workers: int | None = None
) -> list[GradeResult]:
    """Grade ``(problem, response)`` pairs with each problem's grader; results in input order.

    One :func:`pipelines.graders.grade_many` call per grader present, so a grader that runs code grades the
    whole batch in parallel (``workers`` bounds it; ``None``: the grader's default)."""
    out: list[GradeResult | None] = [None] * len(items)
    by_grader: dict[str, list[int]] = {}
    for i, (problem, _) in enumerate(items):
        by_grader.setdefault(problem.grader, []).append(i)
    for grader, idx in by_grader.items():
        results = grade_many(grader, [(items[i][1], items[i][0].reference) for i in idx], workers=workers)
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]


def special_token_ids(
    model: PreTrainedModel | ServedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, list[int]]:
    """``(pad_token_id, eos_token_ids)``: EOS from the generation config (it may list several, e.g. chat models stop
    on ``<|im_end|>`` and ``<|endoftext|>``), else the tokenizer's; pad from the tokenizer, else the first EOS."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return pad, eos_ids


# ---------------------------------------------------------------------------------------------- evaluating
def evaluate_suite(
    model: PreTrainedModel | ServedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: LoadedSuite,
    cfg: EvaluateConfig,
    role: str,
    *,
    engine: RolloutEngine | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[ProblemResult]]:
    """Sample, grade and summarize one suite; returns ``(metrics, per-problem results)`` (keys: :data:`METRIC_KEYS`).

    ``engine``: any :class:`~trainer.rollout.RolloutEngine` (default: HF ``generate`` on ``model``); an engine that
    holds its own weights (vLLM) takes a :class:`ServedModel`.

    Raises ``ValueError`` when a prompt plus ``max_new_tokens`` exceeds the model's ``max_position_embeddings``.
    """
    pad_id, eos_ids = special_token_ids(model, tokenizer)
    engine = engine or HFGenerateEngine(pad_id, eos_ids)
    prompts = [
        encode_prompt(
            tokenizer,
            with_suffix(p.prompt, prompt_suffix_for(suite, p, cfg.prompt_suffix)),
            chat=not suite.embedded,
        )
        for p in suite.problems
    ]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if max_pos is not None and longest + cfg.max_new_tokens > max_pos:
        raise ValueError(
            f"suite {suite.name!r}: the longest prompt has {longest} tokens; with evaluate.max_new_tokens="
            f"{cfg.max_new_tokens} that exceeds the model's max_position_embeddings={max_pos}"
        )

    torch.manual_seed(cfg.seed)
    results: list[ProblemResult] = []
    bar = tqdm(total=len(prompts), desc=f"eval {role}/{suite.name}", unit="problem", disable=not progress)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = suite.problems[start : start + cfg.batch_size]
        batch = engine.generate(
            model,
            prompts[start : start + cfg.batch_size],
            n=cfg.k,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
        )
        lengths = batch.response_lengths.tolist()
        texts = [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(batch.response_ids, lengths, strict=True)
        ]
        # the engine keeps the k rows of a prompt contiguous: row j * k + i is sample i of chunk[j]
        grades = grade_responses([(chunk[i // cfg.k], t) for i, t in enumerate(texts)])
        for j, problem in enumerate(chunk):
            rows = slice(j * cfg.k, (j + 1) * cfg.k)
            correct = [g.correct for g in grades[rows]]
            results.append(
                ProblemResult(
                    suite=suite.name,
                    role=role,
                    problem_id=problem.problem_id,
                    k=cfg.k,
                    n_correct=sum(correct),
                    mean_length=sum(lengths[rows]) / cfg.k,
                    responses=texts[rows],
                    correct=correct,
                    lengths=lengths[rows],
                    grader=problem.grader,
                    reasons=[g.reason for g in grades[rows]],
                )
            )
        bar.update(len(chunk))
    bar.close()
    return summarize(results, k=cfg.k, seed=cfg.seed), results


def summarize(results: Sequence[ProblemResult], *, k: int, seed: int) -> dict[str, Any]:
    """The metrics dict of docs/contracts.md for one (suite, role) from its per-problem results."""
    n_correct = [r.n_correct for r in results]
    ci = bootstrap_ci([c / k for c in n_correct], seed=seed)
    return {
        "avg_at_k": avg_at_k(n_correct, k),
        "pass_at_k": pass_at_k(n_correct, n=k, k=k),
        "best_at_k": best_at_k(n_correct, k),
        "avg_at_k_ci95": [ci[0], ci[1]],
        **length_stats([n for r in results for n in r.lengths]),
        "dist_4g": distinct_4gram_ratio([r.responses for r in results]),
        "n_problems": len(results),
        "k": k,
    }


def _resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_loaded(
    model: PreTrainedModel | ServedModel,
    tokenizer: PreTrainedTokenizerBase,
    suites: Sequence[EvalSuite | LoadedSuite],
    cfg: EvaluateConfig,
    role: str,
    *,
    engine: RolloutEngine | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[ProblemResult]]:
    """:func:`evaluate_model` for an already loaded model (e.g. the trainer's in-memory student) or a model an
    ``engine`` serves (``model`` then a :class:`ServedModel`); ``engine`` is used, not closed."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not suites:
        raise ValueError("no eval suites given (evaluate.suites is empty)")
    loaded = [s if isinstance(s, LoadedSuite) else load_suite(s, cfg.embedded_path) for s in suites]
    names = [s.name for s in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"eval suite names must be unique, got {names}")
    summary: dict[str, dict[str, Any]] = {}
    rows: list[ProblemResult] = []
    for suite in loaded:
        summary[suite.name], suite_rows = evaluate_suite(
            model, tokenizer, suite, cfg, role, engine=engine, progress=progress
        )
        rows.extend(suite_rows)
    return summary, rows


def start_vllm(
    model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, cfg: EvaluateConfig, device: torch.device
) -> tuple[ServedModel, RolloutEngine]:
    """``evaluate.engine: vllm``: the :class:`ServedModel` of ``model_dir`` and a
    :class:`trainer.rollout_vllm.VLLMEngine` serving it in fp32 (``cfg.vllm``; the caller closes it). Raises
    :class:`~trainer.config.ConfigError` (one line) without vLLM or for a model it cannot serve."""
    from trainer.rollout_vllm import VLLMEngine  # vLLM is an optional install; import it only when asked for

    served = ServedModel.from_pretrained(model_dir)
    pad_id, eos_ids = special_token_ids(served, tokenizer)
    engine = VLLMEngine.from_pretrained(
        model_dir, cfg.vllm, pad_token_id=pad_id, eos_token_id=eos_ids, seed=cfg.seed, dtype=torch.float32,
        device=device,
    )  # fmt: skip
    return served, engine


def evaluate_model(
    model_dir: str | Path,
    suites: Sequence[EvalSuite | LoadedSuite],
    cfg: EvaluateConfig,
    role: str,
    *,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[ProblemResult]]:
    """Evaluate the Hugging Face model in ``model_dir`` on ``suites`` as ``role`` with the ``evaluate.engine``.

    Returns ``({suite: metrics}, per-problem results)``; metrics keys are :data:`METRIC_KEYS`, accuracies in [0, 1].

    Raises:
        ValueError: unknown ``role``, no or duplicate suites, a model without EOS, prompts too long for the model.
        trainer.config.ConfigError: ``evaluate.engine: vllm`` without vLLM, or a model vLLM cannot serve.
        FileNotFoundError / pipelines.suites.SuiteFormatError: a missing or malformed suite file.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    # The trainer's loader: stock AutoTokenizer, checked against the directory's own tokenizer.json (a model-type
    # tokenizer class can rebuild a custom vocabulary with a different pre-tokenizer).
    tokenizer = load_tokenizer(model_dir)
    device = _resolve_device(cfg.device)
    if cfg.engine == "hf":
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
        model.to(device).eval()
        return evaluate_loaded(model, tokenizer, suites, cfg, role, progress=progress)
    served, engine = start_vllm(model_dir, tokenizer, cfg, device)
    try:
        return evaluate_loaded(served, tokenizer, suites, cfg, role, engine=engine, progress=progress)
    finally:
        engine.close()


# -------------------------------------------------------------------------------------------------- output
def write_eval_outputs(
    results: Mapping[str, tuple[Mapping[str, Mapping[str, Any]], Sequence[ProblemResult]]],
    metrics_path: str | Path = "metrics/eval.json",
    per_problem_path: str | Path = "artifacts/eval/per_problem.jsonl",
    responses_path: str | Path | None = "artifacts/eval/responses.jsonl",
) -> dict[str, dict[str, dict[str, Any]]]:
    """Write the evaluate stage's files (docs/contracts.md) from ``{role: evaluate_model(...)}``.

    Returns the ``{suite: {role: metrics}}`` tree written to ``metrics_path``. ``responses_path=None`` skips the
    responses file.
    """
    tree: dict[str, dict[str, dict[str, Any]]] = {}
    for role, (summary, _) in results.items():
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        for suite, metrics in summary.items():
            missing = [key for key in METRIC_KEYS if key not in metrics]
            if missing:
                raise ValueError(f"metrics for {suite}/{role} lack {missing}")
            tree.setdefault(suite, {})[role] = {key: metrics[key] for key in METRIC_KEYS}
    atomic_write_text(Path(metrics_path), json.dumps(tree, indent=2, sort_keys=True) + "\n")
    rows = [r for _, (_, problem_rows) in results.items() for r in problem_rows]
    atomic_write_text(Path(per_problem_path), "".join(json.dumps(r.contract_row()) + "\n" for r in rows))
    if responses_path is not None:
        lines = []
        for r in rows:
            d = asdict(r)
            lines.append(json.dumps({key: d[key] for key in RESPONSE_KEYS}))
        atomic_write_text(Path(responses_path), "".join(line + "\n" for line in lines))
    return tree
