"""Micro-batched update: packing by a token budget, 1 vs N micro-batches give the same loss, gradients and metrics
for every method (fp32), activation checkpointing changes memory and not the result, and 2 FSDP2 processes with
micro-batches (and checkpointing) match 2 processes without."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.config import DistillConfig, OPDConfig, RepConfig
from trainer.distributed import enable_activation_checkpointing
from trainer.hidden import layer_indices
from trainer.memory import PeakMemory
from trainer.microbatch import accumulate_update, micro_batches, padded_tokens
from trainer.models import LayerPlan
from trainer.objectives import Objective
from trainer.rollout import RolloutBatch, build_rollout_batch, left_pad

EOS, PAD = 2, 0


def _model(seed: int, *, hidden=16, layers=3, vocab=29, positions=64) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=EOS,
        pad_token_id=PAD, bos_token_id=1, max_position_embeddings=positions,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _batch(prompt_lens, resp_lens, width, vocab=29, seed=0) -> RolloutBatch:
    """Rows with the given prompt lengths and valid response lengths (EOS last, or no EOS when == width)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    ids, mask = left_pad(prompts, PAD)
    resp = torch.randint(3, vocab, (len(resp_lens), width), generator=g)
    for i, n in enumerate(resp_lens):
        if n < width:
            resp[i, n - 1] = EOS
    return build_rollout_batch(
        ids, mask, resp, torch.arange(len(resp_lens)), eos_token_id=EOS, pad_token_id=PAD
    )


PROMPTS, RESPONSES, WIDTH = [3, 5, 2, 4, 5, 1], [7, 12, 1, 12, 4, 9], 12


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return _model(0), _model(1).eval().requires_grad_(False)


def test_micro_batches_pack_within_budget_and_keep_every_row_once():
    batch = _batch(PROMPTS, RESPONSES, WIDTH)
    for budget in (1, 17, 20, 40, 10_000):
        micro = micro_batches(batch, budget)
        rows = sorted(int(i) for mb in micro for i in mb.prompt_index)
        assert rows == list(range(len(PROMPTS)))
        for mb in micro:
            assert padded_tokens(mb) <= budget or mb.input_ids.shape[0] == 1
            for j, row in enumerate(mb.prompt_index.tolist()):
                # the same valid tokens at the same positions, only padding trimmed
                keep = batch.attention_mask[row].bool()
                assert torch.equal(mb.input_ids[j][mb.attention_mask[j].bool()], batch.input_ids[row][keep])
                assert torch.equal(
                    mb.position_ids[j][mb.attention_mask[j].bool()], batch.position_ids[row][keep]
                )
                assert int(mb.response_mask[j].sum()) == RESPONSES[row]
    assert len(micro_batches(batch, 1)) == len(PROMPTS)  # every row alone when the budget is below any row
    assert micro_batches(batch, None) == [batch]
    assert len(micro_batches(batch, 10_000)) == 1


CASES = {
    "oprd": dict(method="oprd"),
    "oprd_last_k_seq_mean": dict(
        method="oprd", rep=RepConfig(positions="last_k", k=5, aggregation="seq-mean-token-mean", layers="odd")
    ),
    "oprd_first_k_normalized": dict(method="oprd", rep=RepConfig(positions="first_k", k=4, normalize=True)),
    "oprd_last": dict(method="oprd", rep=RepConfig(positions="last", layers="last")),
    "opd_sampled": dict(method="opd_sampled"),
    "opd_topk": dict(method="opd_topk", opd=OPDConfig(top_k=4)),
    "full_kl": dict(method="full_kl"),
    "full_kl_chunked": dict(method="full_kl", opd=OPDConfig(kl_chunk_size=5)),
    "combined": dict(method="combined", rep=RepConfig(coef=0.5)),
}


def _grads(model) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
    )


def _update(student, teacher, batch, case, budget, *, checkpointing=False):
    cfg = DistillConfig(**{"rep": RepConfig(positions="all"), **CASES[case]})
    plan_layers = layer_indices(3, cfg.rep.layers)
    obj = Objective(
        cfg, LayerPlan(student=plan_layers, teacher=plan_layers), chunked_kl=case == "full_kl_chunked"
    )
    student.zero_grad(set_to_none=True)
    micro = micro_batches(batch, budget)
    upd = accumulate_update(obj, student, teacher, micro, obj.denominators(batch))
    return upd, _grads(student)


@pytest.mark.parametrize("case", list(CASES))
def test_one_vs_many_micro_batches_same_loss_gradients_and_metrics(pair, case):
    student, teacher = pair
    batch = _batch(PROMPTS, RESPONSES, WIDTH)
    one, g1 = _update(student, teacher, batch, case, None)
    many, gn = _update(student, teacher, batch, case, 20)  # 20 tokens: 4 micro-batches of 1-2 rows
    assert many.micro_batches >= 4 and one.micro_batches == 1
    assert g1.abs().sum() > 0
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gn, g1, rtol=1e-4, atol=1e-7)
    assert many.metrics.keys() == one.metrics.keys()
    for k in one.metrics:  # loss terms and per-layer cosines: token-weighted over the whole step
        assert many.metrics[k] == pytest.approx(one.metrics[k], rel=1e-5, abs=1e-7), k
    if CASES[case]["method"] == "oprd":
        assert any(k.startswith("rep/cosine/layer_") for k in one.metrics)


def test_cosine_metric_is_token_weighted_not_a_mean_of_micro_batch_means(pair):
    """Rows of very different lengths: the per-micro-batch mean of means would differ from the token mean."""
    student, teacher = pair
    batch = _batch([2, 2], [12, 1], WIDTH)
    one, _ = _update(student, teacher, batch, "oprd", None)
    many, _ = _update(student, teacher, batch, "oprd", 14)
    assert many.micro_batches == 2
    assert many.metrics["rep/cosine/layer_3"] == pytest.approx(one.metrics["rep/cosine/layer_3"], rel=1e-5)


@pytest.mark.parametrize("case", ["oprd", "opd_topk"])
def test_activation_checkpointing_same_result_less_memory(case):
    torch.set_num_threads(1)
    # Long sequences, narrow model: activations dominate the update's transient memory.
    kw = dict(hidden=32, layers=4, vocab=29, positions=1024)
    teacher = _model(1, **kw).eval().requires_grad_(False)
    batch = _batch([4, 4], [400, 300], 400)
    results = []
    for ckpt in (False, True):
        student = _model(0, **kw).train()
        if ckpt:
            enable_activation_checkpointing(student)
        cfg = DistillConfig(**{"rep": RepConfig(positions="all"), **CASES[case]})
        idx = layer_indices(4, "all")
        obj = Objective(cfg, LayerPlan(student=idx, teacher=idx), monitor_cosine=False)
        den = obj.denominators(batch)
        targets = obj.prepare(student, teacher, batch)
        with PeakMemory("profiler") as pm:
            loss, _ = obj.loss(student, batch, targets, den)
            loss.backward()
            del loss
        results.append((_grads(student), pm.peak_bytes))
    (g0, peak0), (g1, peak1) = results
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)
    assert peak1 < 0.75 * peak0, (peak0, peak1)


# ---------------------------------------------------------------------------------------- FSDP2, 2 processes
def _train_args(pair, tmp: Path, extra: dict) -> list[str]:
    sets = {
        "models.teacher.path": pair["teacher"], "models.student.path": pair["student"], "models.embedded": False,
        "task.prompts_file": pair["prompts"], "rollout.max_new_tokens": 8, "rollout.temperature": 0,
        "distill.steps": 3, "distill.prompts_per_step": 8, "distill.n_responses": 1, "distill.eval_every": 0,
        "distill.memory_every": 0, "optim.lr": 3e-3, "optim.num_threads": 1, "checkpoint.dir": tmp / "ckpt",
        "checkpoint.every": 0, **extra,
    }  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text("{}\n")
    out = ["--params", str(tmp / "params.yaml"), "--out", str(tmp / "out")]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _rows(tmp: Path) -> list[dict]:
    return [json.loads(r) for r in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_fsdp2_micro_batches_and_checkpointing_match_one_micro_batch(tiny_pair, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    import os

    env = {**os.environ, **env}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.train",
    ]
    # Prompts of 4 to 13 characters: ranks pack their 4 rows into different numbers of micro-batches, which FSDP2
    # cannot run (every forward/backward is a collective) unless the trainer splits up to the largest count.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"prompt": "{10**a + b}+{b}="}}\n' for a in range(1, 9) for b in range(3, 7))
    )
    runs = {
        "one": {"task.prompts_file": prompts},
        # 4 prompts per rank of 5-14 + 8 tokens: a 30-token budget gives 2-4 micro-batches per rank
        "many": {"task.prompts_file": prompts, "distill.micro_batch_tokens": 30,
                 "optim.activation_checkpointing": True},
    }  # fmt: skip
    for name, extra in runs.items():
        res = subprocess.run([*cmd, *_train_args(tiny_pair, tmp_path / name, extra)], env=env,
                             capture_output=True, text=True, timeout=400)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    one, many = _rows(tmp_path / "one"), _rows(tmp_path / "many")
    assert [r["perf/micro_batches"] for r in one] == [1.0] * 3
    assert all(r["perf/micro_batches"] >= 2 for r in many)
    assert sum(r["perf/micro_batch_splits"] for r in many) >= 1  # the ranks' counts differed and were evened
    for key in ("loss/total", "rep/cosine/mean", "optim/grad_norm"):
        assert [r[key] for r in many] == pytest.approx([r[key] for r in one], rel=2e-5, abs=1e-7), key
    assert many[-1]["loss/total"] < many[0]["loss/total"]  # and it trains


# ------------------------------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")


@cuda
@pytest.mark.parametrize("case", ["oprd", "opd_topk"])
def test_cuda_bf16_micro_batches_match_one_micro_batch(case):
    dev = torch.device("cuda")
    student, teacher = _model(0).to(dev), _model(1).to(dev).eval().requires_grad_(False)
    enable_activation_checkpointing(student)
    batch = _batch(PROMPTS, RESPONSES, WIDTH).to(dev)
    cfg = DistillConfig(**{"rep": RepConfig(positions="all"), **CASES[case]})
    idx = layer_indices(3, "all")
    obj = Objective(cfg, LayerPlan(student=idx, teacher=idx))
    out = []
    for budget in (None, 20):
        student.zero_grad(set_to_none=True)
        upd = accumulate_update(
            obj, student, teacher, micro_batches(batch, budget), obj.denominators(batch),
            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16),
        )  # fmt: skip
        out.append((upd.loss, _grads(student)))
    (l1, g1), (ln, gn) = out
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(ln, l1, rtol=2e-2, atol=1e-4)  # bf16: different shapes round differently
    assert torch.nn.functional.cosine_similarity(gn, g1, dim=0) > 0.99


@pytest.mark.parametrize("case", ["oprd", "oprd_last_k_seq_mean"])
def test_micro_batched_loss_is_the_reference_aggregate_over_rows(pair, case):
    """token-mean = Σ over rows of token sums / all tokens; seq-mean-token-mean = mean over rows of each row's
    token-mean (paper Eq. 6). Both from rows scored one at a time with their own counts."""
    student, teacher = pair
    batch = _batch(PROMPTS, RESPONSES, WIDTH)
    many, _ = _update(student, teacher, batch, case, 20)
    cfg = DistillConfig(**{"rep": RepConfig(positions="all"), **CASES[case]})
    idx = layer_indices(3, cfg.rep.layers)
    obj = Objective(cfg, LayerPlan(student=idx, teacher=idx))
    per_row, counts = [], []
    with torch.no_grad():
        for mb in micro_batches(batch, 1):  # one row each
            den = obj.denominators(mb)
            loss, _ = obj.loss(student, mb, obj.prepare(student, teacher, mb), den)
            per_row.append(loss.item())
            counts.append(den.selected.item())
    if cfg.rep.aggregation == "token-mean":
        expected = sum(v * c for v, c in zip(per_row, counts, strict=True)) / sum(counts)
    else:
        expected = sum(per_row) / len(per_row)
    assert many.loss.item() == pytest.approx(expected, rel=1e-5)


def test_bench_memory_sweep_is_flat_with_micro_batches(tmp_path):
    """`oprd-ci bench update --sequences ... --micro-batch-tokens none,N` at a tiny shape: one micro-batch grows
    with the batch, micro-batches of one sequence do not (profiler replay: deterministic bytes)."""
    from typer.testing import CliRunner

    from oprd_ci.cli import app

    out = tmp_path / "sweep.json"
    args = ["bench", "update", "--out", str(out), "--vocab", "3000", "--hidden", "32", "--intermediate", "64",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--prompt-len", "8", "--response-len", "96",
            "--sequences", "2,6", "--micro-batch-tokens", "none,104", "--methods", "oprd,opd_topk", "--threads", "1",
            "--quiet"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cells = {
        (c["seqs"], c["micro_batch_tokens"], c["method"]): c for c in json.loads(out.read_text())["cells"]
    }
    for m in ("oprd", "opd_topk"):
        one2, one6 = cells[(2, None, m)]["peak_memory_bytes"], cells[(6, None, m)]["peak_memory_bytes"]
        mb2, mb6 = cells[(2, 104, m)]["peak_memory_bytes"], cells[(6, 104, m)]["peak_memory_bytes"]
        assert cells[(6, 104, m)]["micro_batches"] == 6
        assert one6 > 2 * one2  # one micro-batch: grows with the sequences
        assert mb6 < 1.25 * mb2 and mb6 < 0.5 * one6  # micro-batched: flat
    bad = CliRunner().invoke(app, ["bench", "update", "--out", str(out), "--micro-batch-tokens", "none,x"])
    assert bad.exit_code == 2 and "--micro-batch-tokens" in bad.output


# ------------------------------------------------------------------------------------------------- streaming
def _stream_run(prompt_lens, resp_lens, budget, starts, seed=0):
    """Feed a :class:`MicroBatchStream` the progress an engine would report: row ``i`` starts sampling at step
    ``starts[i]`` and gains one token per step until it reaches ``resp_lens[i]`` (EOS last). Returns the stream,
    the finished batch, and per submission the number of rows still open at that moment."""
    from trainer.microbatch import MicroBatchStream

    width = max(resp_lens)
    batch = _batch(prompt_lens, resp_lens, width, seed=seed)
    prompts = [
        batch.input_ids[i, : batch.prompt_len][batch.attention_mask[i, : batch.prompt_len].bool()].tolist()
        for i in range(len(prompt_lens))
    ]
    tokens = [batch.response_ids[i, :n].tolist() for i, n in enumerate(resp_lens)]
    open_at_submit: list[int] = []
    sent: list[RolloutBatch] = []
    state = {"open": len(resp_lens)}

    def submit(mb):
        open_at_submit.append(state["open"])
        sent.append(mb)
        return len(sent) - 1

    stream = MicroBatchStream(
        prompts, 1, pad_token_id=PAD, eos_token_id=EOS, max_tokens=budget, submit=submit
    )
    done: set[int] = set()
    for t in range(max(s + n for s, n in zip(starts, resp_lens, strict=True)) + 1):
        finished = {
            i: tokens[i] for i in range(len(tokens)) if i not in done and t - starts[i] == resp_lens[i]
        }
        done |= finished.keys()
        state["open"] = len(tokens) - len(done)
        opened = {i: max(0, min(t - starts[i], resp_lens[i])) for i in range(len(tokens)) if i not in done}
        stream.progress(finished, opened)
    micro, results = stream.finish(batch)
    return stream, batch, micro, results, sent, open_at_submit


@pytest.mark.parametrize("starts", ["together", "staggered"])
@pytest.mark.parametrize("budget", [17, 30, 60])
def test_stream_sends_the_same_micro_batches_as_they_settle(budget, starts):
    """The streamed micro-batches are exactly :func:`micro_batches` of the finished batch (same rows, same trimmed
    tensors, same order), and the short ones went out while longer rows were still being sampled."""
    prompt_lens = [3, 5, 2, 4, 5, 1, 6, 2, 3, 4]
    resp_lens = [7, 12, 1, 12, 4, 9, 2, 5, 12, 3]
    st = [0] * 10 if starts == "together" else [0, 3, 1, 0, 2, 4, 0, 1, 5, 2]
    stream, batch, micro, results, sent, open_at = _stream_run(prompt_lens, resp_lens, budget, st)
    assert results == list(range(len(micro)))  # one submission per micro-batch, in order, none resent
    expected = micro_batches(batch, budget)
    assert len(micro) == len(expected) == len(sent) > 1
    for a, b, c in zip(micro, expected, sent, strict=True):
        for name in ("input_ids", "attention_mask", "position_ids", "response_mask", "prompt_index"):
            assert torch.equal(getattr(a, name), getattr(b, name)) and torch.equal(
                getattr(c, name), getattr(b, name)
            )
        assert a.prompt_len == b.prompt_len == c.prompt_len
    assert stream.submitted_early == sum(n > 0 for n in open_at) >= 1


def test_stream_never_sends_a_group_a_later_row_could_join():
    """A short row that finishes while a row with a longer prompt but fewer tokens so far is still open must wait:
    that row may still end up sorting before it."""
    # row 0: prompt 1 + 2 tokens (key 3) finishes at step 2; row 1: prompt 8 starts at step 5 and ends with 1
    # token (key 9); row 2: prompt 1, 1 token, starts at step 6 (key 2 < 3): it must share row 0's group.
    stream, _, micro, results, _sent, _open_at = _stream_run([1, 8, 1], [2, 1, 1], 9, [0, 5, 6])
    assert [mb.input_ids.shape[0] for mb in micro] == [2, 1]
    assert [sorted(g) for g in stream.groups] == [[0, 2], [1]] and results == [0, 1]


def test_stream_without_a_budget_sends_the_whole_batch_once():
    _stream, batch, micro, results, sent, open_at = _stream_run([3, 5], [2, 4], None, [0, 0])
    assert micro == [batch] and results == [0] and len(sent) == 1 and open_at == [0]


def test_split_to_reaches_the_count_with_the_same_rows_trimmed():
    from trainer.microbatch import split_to

    batch = _batch(PROMPTS, RESPONSES, WIDTH)
    micro = micro_batches(batch, 40)
    for count in range(len(micro), len(PROMPTS) + 1):
        out, origin = split_to(micro, count)
        assert len(out) == len(origin) == count
        assert sorted(int(i) for mb in out for i in mb.prompt_index) == list(range(len(PROMPTS)))
        for mb, o in zip(out, origin, strict=True):
            if o is not None:
                assert mb is micro[o]
            expected = micro_batches(_rows_of(batch, mb.prompt_index.tolist()), None)[0]
            ref = micro_batches(expected, 10**6)[0]  # trimmed to its own lengths
            assert torch.equal(mb.input_ids, ref.input_ids) and torch.equal(
                mb.response_mask, ref.response_mask
            )
    with pytest.raises(ValueError, match="too few rows"):
        split_to(micro, len(PROMPTS) + 1)


def _rows_of(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    from trainer.microbatch import _rows

    return _rows(batch, rows)
