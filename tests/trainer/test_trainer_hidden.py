"""Layer/position selection (TV1, TV5, Eq. 11) and backbone-only capture."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.hidden import (
    capture_hidden_states,
    layer_indices,
    position_mask,
    proportional_layer_map,
    select_positions,
    teacher_layer_indices,
)

V_LENGTHS = torch.tensor([5, 8, 0])


def _mask_rows(mask):
    return ["".join(str(int(x)) for x in row) for row in mask.tolist()]


def _response_mask(valid, r=8):
    return (torch.arange(r).unsqueeze(0) < valid.unsqueeze(1)).long()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("all", ["11111000", "11111111", "00000000"]),
        ("last", ["00001000", "00000001", "00000000"]),
        ("first_k", ["11100000", "11100000", "00000000"]),
        ("last_k", ["00111000", "00000111", "00000000"]),
    ],
)
def test_tv1_position_masks(mode, expected):
    assert _mask_rows(position_mask(_response_mask(V_LENGTHS), mode, k=3)) == expected


@pytest.mark.parametrize("mode", ["first_k", "last_k"])
def test_tv1_compact_masks(mode):
    _, m = select_positions(torch.zeros(3, 8, 2), _response_mask(V_LENGTHS), mode, k=3)
    assert m.long().tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    _, m2 = select_positions(torch.zeros(1, 8, 2), _response_mask(torch.tensor([2])), "last_k", k=3)
    assert m2.long().tolist() == [[1, 1, 0]]


def test_compaction_copies_the_right_slots_left_aligned():
    h = torch.arange(8.0).view(1, 8, 1).repeat(2, 1, 1)  # slot t holds value t
    rm = _response_mask(torch.tensor([5, 2]))
    s, m = select_positions(h, rm, "last_k", k=3)
    assert s[..., 0].tolist() == [[2.0, 3.0, 4.0], [0.0, 1.0, 0.0]]
    s, _ = select_positions(h, rm, "first_k", k=3)
    assert s[..., 0].tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 0.0]]
    s, m = select_positions(h, rm, "last", k=3)
    assert s[..., 0].tolist() == [[4.0], [1.0]] and m.all()


def test_tv5_layer_indices():
    assert layer_indices(4, "last") == [4]
    assert layer_indices(4, "all") == [1, 2, 3, 4]
    assert layer_indices(4, "even") == [1, 3]
    assert layer_indices(4, "odd") == [2, 4]
    assert layer_indices(28, "even") == list(range(1, 28, 2))
    assert layer_indices(28, "odd") == list(range(2, 29, 2))
    with pytest.raises(ValueError, match="0 is the embedding"):
        layer_indices(4, [0, 2])


def test_proportional_map():
    assert proportional_layer_map(4, 4) == [0, 1, 2, 3]
    assert proportional_layer_map(1, 7) == [6]
    assert proportional_layer_map(3, 1) == [0, 0, 0]
    # linspace(0, 35, 28) rounded half-to-even; endpoints fixed
    m = proportional_layer_map(28, 36)
    assert m[0] == 0 and m[-1] == 35 and len(m) == 28 and m == sorted(m)
    assert teacher_layer_indices([1, 2, 4], 4, 8) == [1, 3, 8]  # last student index -> teacher's normed last


def _tiny_model(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=31,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def test_capture_matches_hf_hidden_states_and_never_builds_vocab_logits():
    torch.set_num_threads(1)
    model = _tiny_model()
    ids = torch.randint(0, 31, (2, 9))
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding on row 1
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    am[1, -2:] = 0
    seen = []
    h = model.lm_head.register_forward_hook(lambda _m, i, _o: seen.append(tuple(i[0].shape)))
    got = capture_hidden_states(model, ids, am, pos, rm, [1, 2, 3], "all")
    h.remove()
    assert seen == [(2, 0, 16)]  # the LM head only ever saw an empty position axis
    ref = model(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True).hidden_states
    expected = torch.stack([ref[i][:, -4:] for i in (1, 2, 3)], dim=1)
    torch.testing.assert_close(got.states, expected)
    assert got.mask.tolist() == rm.bool().tolist()
    assert got.logits is None


def test_capture_with_logits_gives_response_predictions():
    model = _tiny_model()
    ids = torch.randint(0, 31, (2, 7))
    am = torch.ones_like(ids)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    rm = torch.ones(2, 3, dtype=torch.long)
    got = capture_hidden_states(model, ids, am, pos, rm, [3], "last", with_logits=True)
    full = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    torch.testing.assert_close(got.logits, full[:, -4:-1])
    assert got.states.shape == (2, 1, 1, 16)


def test_student_grad_flows_through_capture():
    model = _tiny_model().train()
    ids = torch.randint(0, 31, (1, 6))
    am = torch.ones_like(ids)
    got = capture_hidden_states(model, ids, am, (am.cumsum(-1) - 1), torch.ones(1, 2), [1, 3], "all")
    got.states.pow(2).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.lm_head.weight.grad is not None  # tied to the embedding, which the backbone uses
