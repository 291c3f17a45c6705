"""HFGenerateEngine on a tiny config-built Qwen2: layout, masks, EOS handling, padding invariance, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.rollout import HFGenerateEngine, RolloutBatch, RolloutEngine, build_rollout_batch

PAD, BOS, EOS = 0, 1, 2
VOCAB = 20


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    m = Qwen2ForCausalLM(cfg)
    m.eval()
    return m


def test_engine_satisfies_protocol() -> None:
    assert isinstance(HFGenerateEngine(PAD, EOS), RolloutEngine)


def test_layout_and_masks(model: Qwen2ForCausalLM) -> None:
    prompts = [[BOS, 5, 6, 7], [BOS, 8], [BOS, 9, 10]]
    torch.manual_seed(1)
    batch = HFGenerateEngine(PAD, EOS).generate(
        model, prompts, n=3, temperature=1.0, top_p=1.0, max_new_tokens=6
    )
    B, T = batch.input_ids.shape
    P = batch.prompt_len
    R = T - P
    assert (B, P) == (9, 4) and 1 <= R <= 6
    assert batch.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Left-padded prompts: real tokens right-aligned, mask 1 exactly on them.
    for row in range(B):
        p = prompts[int(batch.prompt_index[row])]
        assert batch.input_ids[row, P - len(p) : P].tolist() == p
        assert batch.attention_mask[row, :P].tolist() == [0] * (P - len(p)) + [1] * len(p)
        assert (batch.input_ids[row, : P - len(p)] == PAD).all()
    assert torch.equal(batch.response_mask, batch.attention_mask[:, -R:])
    assert torch.equal(batch.position_ids, (batch.attention_mask.cumsum(-1) - 1).clamp(min=0))
    # Response mask: ones up to and including the first EOS, zeros (and pad tokens) after it.
    for row in range(B):
        resp = batch.response_ids[row].tolist()
        length = int(batch.response_lengths[row])
        assert batch.response_mask[row].tolist() == [1] * length + [0] * (R - length)
        if EOS in resp[:length]:
            assert resp.index(EOS) == length - 1
        else:
            assert length == R
        assert all(t == PAD for t in resp[length:])


def test_padded_prompt_gives_same_last_logits_as_unpadded(model: Qwen2ForCausalLM) -> None:
    prompts = [[BOS, 5, 6, 7, 8, 9], [BOS, 11]]
    torch.manual_seed(2)
    batch = HFGenerateEngine(PAD, EOS).generate(
        model, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4
    )
    with torch.no_grad():
        padded = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        for row in range(2):
            length = int(batch.attention_mask[row].sum())
            real = batch.input_ids[row][batch.attention_mask[row].bool()].unsqueeze(0)
            alone = model(real).logits
            last_valid = int(batch.attention_mask[row].nonzero().max())
            torch.testing.assert_close(padded[row, last_valid], alone[0, length - 1], atol=1e-5, rtol=1e-4)
            # The last prompt token too (the logits that produced the first response token).
            n_prompt = len(prompts[row])
            torch.testing.assert_close(
                padded[row, batch.prompt_len - 1], alone[0, n_prompt - 1], atol=1e-5, rtol=1e-4
            )


def test_same_seed_same_rollouts_and_mode_restored(model: Qwen2ForCausalLM) -> None:
    engine = HFGenerateEngine(PAD, EOS)
    prompts = [[BOS, 3, 4], [BOS, 5]]
    model.train()
    torch.manual_seed(7)
    a = engine.generate(model, prompts, n=4, temperature=1.0, top_p=0.9, max_new_tokens=8)
    assert model.training, "generate must restore train mode"
    model.eval()
    torch.manual_seed(7)
    b = engine.generate(model, prompts, n=4, temperature=1.0, top_p=0.9, max_new_tokens=8)
    assert not model.training
    assert torch.equal(a.input_ids, b.input_ids)
    torch.manual_seed(8)
    c = engine.generate(model, prompts, n=4, temperature=1.0, top_p=0.9, max_new_tokens=8)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_greedy_rows_of_one_prompt_are_identical(model: Qwen2ForCausalLM) -> None:
    batch = HFGenerateEngine(PAD, EOS).generate(
        model, [[BOS, 4, 5]], n=3, temperature=0.0, top_p=1.0, max_new_tokens=5
    )
    assert torch.equal(batch.input_ids[0], batch.input_ids[1]) and torch.equal(
        batch.input_ids[0], batch.input_ids[2]
    )


def _model_that_always_emits(token: int) -> Qwen2ForCausalLM:
    """A tiny Qwen2 that puts all probability on ``token`` at every step, whatever the input."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        # A zero final-norm weight makes the last hidden state 0, so the (bias-free) head gives logits 0; the hook
        # then adds a bias that leaves only ``token`` with non-negligible probability.
        m.model.norm.weight.zero_()
    bias = torch.full((VOCAB,), -1e4)
    bias[token] = 0.0
    m.lm_head.register_forward_hook(lambda _mod, _inp, out: out + bias)
    return m.eval()


def test_immediate_eos_has_length_one() -> None:
    m = _model_that_always_emits(EOS)
    batch = HFGenerateEngine(PAD, EOS).generate(
        m, [[BOS, 3], [BOS]], n=2, temperature=1.0, top_p=1.0, max_new_tokens=5
    )
    assert batch.response_lengths.tolist() == [1, 1, 1, 1]
    assert (batch.response_ids[:, 0] == EOS).all()
    assert batch.position_ids[0, -1].item() == 2  # BOS, 3, EOS -> positions 0, 1, 2


def test_no_eos_fills_max_new_tokens_and_is_fully_valid() -> None:
    m = _model_that_always_emits(7)
    batch = HFGenerateEngine(PAD, EOS).generate(
        m, [[BOS, 3]], n=2, temperature=0.0, top_p=1.0, max_new_tokens=5
    )
    assert batch.response_ids.shape == (2, 5)
    assert batch.response_lengths.tolist() == [5, 5]
    assert (batch.response_ids == 7).all()


def test_pad_equal_to_eos_is_handled() -> None:
    """Many tokenizers reuse EOS as pad; the mask must still end at the *first* EOS."""
    m = _model_that_always_emits(EOS)
    batch = HFGenerateEngine(EOS, EOS).generate(
        m, [[BOS, 3, 4], [BOS]], n=1, temperature=0.0, top_p=1.0, max_new_tokens=3
    )
    assert batch.response_lengths.tolist() == [1, 1]
    assert batch.attention_mask[1].tolist() == [0, 0, 1, 1]


def test_build_rollout_batch_masks_after_first_of_several_eos() -> None:
    prompt_ids = torch.tensor([[PAD, BOS], [BOS, 3]])
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    resp = torch.tensor([[5, 6, 2, 9], [3, 17, 4, 2]])  # row 1 stops at 17 (second EOS id)
    b = build_rollout_batch(
        prompt_ids, prompt_mask, resp, torch.tensor([0, 1]), eos_token_id=[2, 17], pad_token_id=PAD
    )
    assert b.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert b.response_ids.tolist() == [[5, 6, 2, PAD], [3, 17, PAD, PAD]]
    assert b.position_ids.tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 3, 3]]


def test_to_moves_every_tensor() -> None:
    b = build_rollout_batch(
        torch.tensor([[BOS]]),
        torch.tensor([[1]]),
        torch.tensor([[2]]),
        torch.tensor([0]),
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    moved = b.to("meta")
    assert isinstance(moved, RolloutBatch) and moved.prompt_len == 1
    assert all(t.device.type == "meta" for t in (moved.input_ids, moved.attention_mask, moved.position_ids))
    assert moved.response_mask.device.type == "meta" and moved.prompt_index.device.type == "meta"


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([], {}, "prompts is empty"),
        ([[BOS], []], {}, "prompt 1 has no tokens"),
        ([[BOS]], {"n": 0}, "n must be"),
        ([[BOS]], {"temperature": -1.0}, "temperature"),
        ([[BOS]], {"top_p": 0.0}, "top_p"),
        ([[BOS]], {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_input_is_a_clear_error(model: Qwen2ForCausalLM, prompts, kwargs, match) -> None:
    args = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        HFGenerateEngine(PAD, EOS).generate(model, prompts, **args)


def test_bad_engine_ids_rejected() -> None:
    with pytest.raises(ValueError, match="eos_token_id"):
        HFGenerateEngine(PAD, [])
    with pytest.raises(ValueError, match="pad_token_id"):
        HFGenerateEngine(None, EOS)  # type: ignore[arg-type]


def test_model_generation_config_cannot_change_sampling(model: Qwen2ForCausalLM) -> None:
    """A shipped generation_config.json (top_k, repetition_penalty, min_new_tokens) must not leak into rollouts."""
    engine = HFGenerateEngine(PAD, EOS)
    prompts = [[BOS, 3, 4], [BOS, 5]]
    torch.manual_seed(11)
    clean = engine.generate(model, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=8)
    saved = model.generation_config
    hostile = copy.deepcopy(saved)
    hostile.top_k, hostile.repetition_penalty, hostile.min_new_tokens, hostile.top_p = 1, 5.0, 8, 0.1
    model.generation_config = hostile
    try:
        torch.manual_seed(11)
        again = engine.generate(model, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=8)
    finally:
        model.generation_config = saved
    assert torch.equal(clean.input_ids, again.input_ids)
