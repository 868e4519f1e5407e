"""R2MRewardModel on tiny random-weight Llamas: RTE extraction, padding, cache, re-tokenization,
frozen backbone."""

import copy

import pytest
import torch
from transformers import LlamaForSequenceClassification

from r2m import R2MRewardModel
from r2m.experiment.tiny import tiny_llama_config, tiny_reward_backbone, tiny_tokenizer
from r2m.tokens import last_valid_index

POLICY_DIM = 20


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def rm(tok):
    backbone, score = tiny_reward_backbone(tok)
    return R2MRewardModel(backbone, score, POLICY_DIM, attn_dim=12, num_heads=3)


def pad(rows, side, pad_id=0):
    """(ids, mask) for token lists, padded on `side`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def test_last_valid_index_any_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert last_valid_index(mask).tolist() == [4, 2, 3, 4]
    with pytest.raises(ValueError, match="no valid token"):
        last_valid_index(torch.tensor([[1, 1], [0, 0]]))


def test_rte_is_last_token_state_whatever_the_padding(rm, tok):
    rows = [tok("<u>12+30=</s><a>42")["input_ids"], tok("<u>1=</s>")["input_ids"], [9, 10, 11]]
    alone = torch.cat([rm.compute_rte(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
    for side in ("left", "right"):
        ids, mask = pad(rows, side)
        torch.testing.assert_close(rm.compute_rte(ids, mask), alone, rtol=1e-5, atol=1e-5)
    # and it is the backbone's last hidden state at that token
    out = rm.backbone(input_ids=torch.tensor([rows[0]])).last_hidden_state
    torch.testing.assert_close(alone[0], out[0, -1])


def test_matches_transformers_sequence_classifier(tok):
    model = LlamaForSequenceClassification(tiny_llama_config(len(tok), hidden_size=24, num_labels=1)).eval()
    rm = R2MRewardModel.from_sequence_classifier(model, POLICY_DIM, attn_dim=8)
    ids, mask = pad([[5, 9, 12, 40, 2], [5, 30, 2], [7] * 9], "right")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(rm.static_reward(rm.compute_rte(ids, mask)), expected, rtol=1e-5, atol=1e-6)
    assert rm.score_head is not model.score  # a copy: the RM's own head is never touched
    torch.testing.assert_close(rm.head.score.weight, model.score.weight)


def test_cache_embeds_each_response_once(rm):
    calls = []
    rm.backbone.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    ids, mask = pad([[5, 6, 7], [8, 9], [5, 6, 7], [10]], "left")
    first = rm.reward_token_embeddings(ids, mask)
    assert calls == [3]  # the duplicate row is embedded once
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(first, rm.compute_rte(ids, mask), rtol=1e-5, atol=1e-5)
    calls.clear()
    # the same responses padded differently hit the cache; one new response is embedded alone
    ids2, mask2 = pad([[8, 9], [11, 12, 13, 14], [5, 6, 7]], "right")
    second = rm.reward_token_embeddings(ids2, mask2)
    assert calls == [1]
    torch.testing.assert_close(second[[0, 2]], first[[1, 0]])
    rm.cache_size = 2
    rm.reward_token_embeddings(ids2, mask2)
    assert len(rm._rte_cache) == 2


def test_backbone_frozen_only_head_trains(rm):
    frozen = copy.deepcopy(rm.backbone.state_dict()), copy.deepcopy(rm.score_head.state_dict())
    assert not any(p.requires_grad for p in rm.backbone.parameters())
    assert not any(p.requires_grad for p in rm.score_head.parameters())
    rm.train()
    assert not rm.backbone.training and rm.head.training
    ids, mask = pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], "left")
    rte = rm.reward_token_embeddings(ids, mask)
    hidden = torch.randn(3, 6, POLICY_DIM)
    hmask = torch.ones(3, 6, dtype=torch.long)
    hmask[1, :2] = 0
    with torch.no_grad():  # omega = 1 is the original RM's reward exactly (phi is a copy of score_head)
        torch.testing.assert_close(rm(rte, hidden, mask=hmask, omega=1.0), rm.static_reward(rte))
    rewards = rm(rte, hidden, mask=hmask, omega=0.5)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    opt = torch.optim.SGD(rm.parameters(), lr=0.5)  # everything, on purpose: frozen parts get no grad
    rewards.sum().backward()
    opt.step()
    assert all(p.grad is None for p in rm.backbone.parameters())
    assert all(p.grad is not None for p in rm.head.parameters())
    for before, module in zip(frozen, (rm.backbone, rm.score_head)):
        for name, value in module.state_dict().items():
            assert torch.equal(value, before[name]), name


def test_retokenizes_with_the_rm_tokenizer_when_it_differs(tok):
    rm_tok = tiny_tokenizer(chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    backbone, score = tiny_reward_backbone(rm_tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=rm_tok, attn_dim=8)
    policy_ids, policy_mask = pad([[5, 6, 7], [8]], "left")
    ids, mask = rm.rm_inputs(["1+2=", "9+9="], ["3", "18!"], input_ids=policy_ids, attention_mask=policy_mask,
                             policy_tokenizer=tok)
    texts = [rm_tok.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    assert texts == ["[1+2=][3]", "[9+9=][18!]"]
    # the same tokenizer (or none given) reuses the policy's ids untouched
    same = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=tok, attn_dim=8)
    reused = same.rm_inputs(["x"], ["y"], input_ids=policy_ids, attention_mask=policy_mask, policy_tokenizer=tok)
    assert reused[0] is policy_ids and reused[1] is policy_mask


def test_cache_entries_own_their_storage(rm):
    """Each cached RTE is its own (D_rm,) tensor: a view into the batch's RTEs would keep the
    whole batch alive until every one of its rows is evicted."""
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [5, 6, 7]]
    ids, mask = pad(rows, "left")
    rte = rm.reward_token_embeddings(ids, mask)
    assert len(rm._rte_cache) == 4
    entries = [rm._rte_cache[tuple(row)] for row in rows[:4]]
    for entry in entries:
        assert entry.shape == (rm.rm_dim,)
        assert entry.untyped_storage().nbytes() == rm.rm_dim * entry.element_size()
        assert entry.untyped_storage().data_ptr() != rte.untyped_storage().data_ptr()
    assert len({entry.untyped_storage().data_ptr() for entry in entries}) == len(entries)
    torch.testing.assert_close(torch.stack(entries), rm.compute_rte(ids, mask)[:4], rtol=1e-5, atol=1e-5)


def test_cache_size_default_and_check(tok):
    backbone, score = tiny_reward_backbone(tok)
    assert R2MRewardModel(backbone, score, POLICY_DIM, attn_dim=8).cache_size == 4096
    with pytest.raises(ValueError, match="cache_size"):
        R2MRewardModel(backbone, score, POLICY_DIM, attn_dim=8, cache_size=-1)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, attn_dim=8, cache_size=0)  # 0: nothing kept
    ids, mask = pad([[5, 6], [7]], "right")
    torch.testing.assert_close(rm.reward_token_embeddings(ids, mask), rm.compute_rte(ids, mask))
    assert len(rm._rte_cache) == 0


def test_retokenizes_conversational_prompts(tok):
    """TRL's conversational form (lists of role/content messages) keeps its turns when the RM
    re-tokenizes; without a chat template the turns' texts are joined."""
    rm_tok = tiny_tokenizer(chat_template="{% for m in messages %}[{{ m['role'][0] }}:{{ m['content'] }}]{% endfor %}")
    backbone, score = tiny_reward_backbone(rm_tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=rm_tok, attn_dim=8)
    prompts = [[{"role": "system", "content": "brief"}, {"role": "user", "content": "1+2="}], "9+9="]
    responses = [[{"role": "assistant", "content": "3"}], "18"]
    ids, mask = rm.rm_inputs(prompts, responses, policy_tokenizer=tok)
    assert [rm_tok.decode(row[m.bool()]) for row, m in zip(ids, mask)] == ["[s:brief][u:1+2=][a:3]", "[u:9+9=][a:18]"]
    plain = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=tiny_tokenizer(chat_template=None), attn_dim=8)
    ids, mask = plain.rm_inputs(prompts, responses, policy_tokenizer=tok)
    texts = [plain.tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask)]
    assert texts == ["brief1+2=3", "9+9=18"]


@pytest.mark.parametrize("head_attends", ["sequence", "completion"])
def test_head_mask_keeps_the_completion_only_when_asked(head_attends):
    """HeadUpdate.head_mask on TRL's layout (prompt left-padded in columns 0-2, completion right-
    padded from column 3): the mask itself for "sequence"; the completion's valid positions for
    "completion", except in a row whose completion is masked out (a truncated one), which keeps
    its whole mask; the dtype is kept."""
    from r2m import R2MConfig
    from r2m.head_update import HeadUpdate

    rm = R2MRewardModel(torch.nn.Identity(), torch.nn.Linear(6, 1), 5, attn_dim=4)
    update = HeadUpdate(rm, R2MConfig(head_attends=head_attends))
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    got = update.head_mask(mask, 3)
    want = mask if head_attends == "sequence" else torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0],
                                                                 [0, 1, 1, 0, 0, 0]])
    assert torch.equal(got, want) and got.dtype == mask.dtype
