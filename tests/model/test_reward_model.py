"""R2MRewardModel on tiny random-weight Llamas: the head from its R2MConfig, RTE extraction,
padding, cache, the RM's inputs as TRL makes them, frozen backbone, save and reload."""

import copy

import pytest
import torch
from transformers import LlamaForSequenceClassification

from r2m import R2MConfig, R2MRewardModel
from r2m.experiment.tiny import tiny_llama_config, tiny_reward_backbone, tiny_tokenizer
from r2m.tokens import last_valid_index

POLICY_DIM = 20


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def rm(tok):
    backbone, score = tiny_reward_backbone(tok)
    return R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=12, num_heads=3))


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
    rm = R2MRewardModel.from_sequence_classifier(model, POLICY_DIM, config=R2MConfig(attn_dim=8), tokenizer=tok)
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


def test_rm_inputs_are_what_trl_feeds_a_reward_model(tok):
    """With a tokenizer the RM reads the text, re-tokenized as trl 1.16's _calculate_rewards does
    (text prompts concatenated with their completions; no special tokens added; right padding),
    whatever the policy's ids; without one it reads the policy's ids untouched."""
    backbone, score = tiny_reward_backbone(tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=tok, config=R2MConfig(attn_dim=8))
    policy_ids, policy_mask = pad([[5, 6, 7], [8]], "left")
    ids, mask = rm.rm_inputs(["1+2=", "9+9="], ["3", "18!"], input_ids=policy_ids, attention_mask=policy_mask)
    assert [tok.decode(row[m.bool()]) for row, m in zip(ids, mask)] == ["1+2=3", "9+9=18!"]
    assert mask.tolist() == [[1] * 5 + [0, 0], [1] * 7]  # right padding
    own = R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=8))
    reused = own.rm_inputs(["x"], ["y"], input_ids=policy_ids, attention_mask=policy_mask)
    assert reused[0] is policy_ids and reused[1] is policy_mask


def test_rte_is_at_the_token_the_sequence_classifier_scores(tok):
    """A trailing token equal to the pad token (TRL sets pad = EOS when a tokenizer has no pad)
    is passed over, as transformers' sequence classifier passes it over."""
    rm_tok = tiny_tokenizer()
    rm_tok.pad_token = None
    backbone, score = tiny_reward_backbone(rm_tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=rm_tok, config=R2MConfig(attn_dim=8))
    assert rm_tok.pad_token_id == rm_tok.eos_token_id == 2
    ids, mask = pad([[5, 9, 12, 2], [5, 30, 31, 33, 2, 2], [7, 8]], "right", pad_id=2)
    assert rm.reward_positions(ids, mask).tolist() == [2, 3, 1]
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(rm.compute_rte(ids, mask), hidden[[0, 1, 2], [2, 3, 1]], rtol=1e-5, atol=1e-5)


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
    assert R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=8)).cache_size == 4096
    with pytest.raises(ValueError, match="cache_size"):
        R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=8), cache_size=-1)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=8), cache_size=0)  # 0: nothing kept
    ids, mask = pad([[5, 6], [7]], "right")
    torch.testing.assert_close(rm.reward_token_embeddings(ids, mask), rm.compute_rte(ids, mask))
    assert len(rm._rte_cache) == 0


def test_conversational_prompts_go_through_the_rm_chat_template(tok):
    """TRL's conversational form (lists of role/content messages): prompt and completion turns
    through the RM tokenizer's chat template; without a template, one line naming the problem."""
    rm_tok = tiny_tokenizer(chat_template="{% for m in messages %}[{{ m['role'][0] }}:{{ m['content'] }}]{% endfor %}")
    backbone, score = tiny_reward_backbone(rm_tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=rm_tok, config=R2MConfig(attn_dim=8))
    prompts = [[{"role": "system", "content": "brief"}, {"role": "user", "content": "1+2="}],
               [{"role": "user", "content": "9+9="}]]
    responses = [[{"role": "assistant", "content": "3"}], "18"]
    ids, mask = rm.rm_inputs(prompts, responses)
    assert [rm_tok.decode(row[m.bool()]) for row, m in zip(ids, mask)] == ["[s:brief][u:1+2=][a:3]", "[u:9+9=][a:18]"]
    plain = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=tiny_tokenizer(chat_template=None),
                           config=R2MConfig(attn_dim=8))
    with pytest.raises(ValueError, match="no chat template"):
        plain.rm_inputs(prompts, responses)


def test_the_config_decides_the_head(tok):
    """R2MConfig is the one place that decides the head: every head setting reaches it, and the
    default reward model has R2MConfig()'s head."""
    backbone, score = tiny_reward_backbone(tok)
    config = R2MConfig(attn_dim=16, num_heads=2, omega_floor=0.2, head_backend="eager", mode="bt-only")
    rm = R2MRewardModel(backbone, score, POLICY_DIM, config=config)
    head = rm.head
    assert (head.attn_dim, head.num_heads, head.omega_floor, head.backend) == (16, 2, 0.2, "eager")
    assert rm.config == config and rm.config is not config  # a copy: the caller's object stays the caller's
    default = R2MRewardModel(backbone, score, POLICY_DIM).head
    want = R2MConfig()
    assert (default.attn_dim, default.num_heads, default.omega_floor) == (want.attn_dim, want.num_heads,
                                                                           want.omega_floor)
    config.check_head(head)
    for name, value in (("attn_dim", 8), ("num_heads", 4), ("omega_floor", 0.3), ("head_backend", "torch")):
        other = R2MConfig(**{**rm.config.__dict__, name: value})
        with pytest.raises(ValueError, match=f"head has {name}=.* but r2m_config has {name}={value!r}"):
            other.check_head(head)


def _random_head(rm):
    with torch.no_grad():
        for p in rm.head.parameters():
            p.copy_(torch.randn_like(p))


def test_save_and_reload_without_a_path(tok, tmp_path):
    """A reward model built from a backbone and a score head records no path: save_pretrained
    writes the frozen RM too, and from_pretrained rebuilds the same rewards."""
    backbone, score = tiny_reward_backbone(tok)
    rm = R2MRewardModel(backbone, score, POLICY_DIM, tokenizer=tok,
                        config=R2MConfig(attn_dim=12, num_heads=3, omega_floor=0.25, mode="gre-only"))
    _random_head(rm)
    rm.save_pretrained(tmp_path / "rm")
    loaded = R2MRewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.config == rm.config and loaded.name_or_path is None
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    ids, mask = loaded.rm_inputs(["1+2=", "30+4="], ["3", "34"])
    hidden, hmask = torch.randn(2, 7, POLICY_DIM), torch.ones(2, 7, dtype=torch.long)
    for model in (rm, loaded):
        model.rewards = model(model.compute_rte(ids, mask), hidden, mask=hmask)
    assert torch.equal(loaded.rewards, rm.rewards)
    assert torch.equal(loaded.static_reward(loaded.compute_rte(ids, mask)), rm.static_reward(rm.compute_rte(ids, mask)))


def test_save_and_reload_by_path(tok, tmp_path):
    """A sequence classifier loaded from a folder is recorded by that path, its weights are not
    written again, and from_pretrained loads it from there (or takes the one the user passes)."""
    model = LlamaForSequenceClassification(tiny_llama_config(len(tok), hidden_size=24, num_labels=1)).eval()
    model.save_pretrained(tmp_path / "seqcls")
    tok.save_pretrained(tmp_path / "seqcls")
    loaded_model = LlamaForSequenceClassification.from_pretrained(tmp_path / "seqcls", num_labels=1)
    rm = R2MRewardModel.from_sequence_classifier(loaded_model, POLICY_DIM, config=R2MConfig(attn_dim=8))
    assert rm.name_or_path == str(tmp_path / "seqcls") and rm.tokenizer is not None  # its tokenizer, as TRL loads it
    _random_head(rm)
    rm.save_pretrained(tmp_path / "r2m")
    assert not (tmp_path / "r2m" / "reward_backbone").exists()
    rte = rm.compute_rte(*rm.rm_inputs(["1+1="], ["2"]))
    hidden = torch.randn(1, 4, POLICY_DIM)
    for again in (R2MRewardModel.from_pretrained(tmp_path / "r2m"),
                  R2MRewardModel.from_pretrained(tmp_path / "r2m", model=loaded_model)):
        torch.testing.assert_close(again.compute_rte(*again.rm_inputs(["1+1="], ["2"])), rte)
        assert torch.equal(again(rte, hidden), rm(rte, hidden))


def test_reload_refuses_a_head_that_disagrees_with_its_config(tok, tmp_path):
    """A head file whose tensors do not have the shapes its config gives, or a config of an
    unknown format version, is refused in one line naming the file (and the tensor, both shapes)."""
    import json

    from safetensors.torch import load_file, save_file

    backbone, score = tiny_reward_backbone(tok)
    R2MRewardModel(backbone, score, POLICY_DIM, config=R2MConfig(attn_dim=12, num_heads=3)).save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "r2m_config.json").read_text())
    assert settings["r2m"]["attn_dim"] == 12 and settings["format_version"] == 1 and settings["reward_model"] is None
    assert (settings["rm_dim"], settings["policy_dim"]) == (24, POLICY_DIM)
    weights = load_file(tmp_path / "r2m_head.safetensors")
    weights["q_proj.weight"] = torch.zeros(6, 24)
    save_file(weights, tmp_path / "r2m_head.safetensors")
    with pytest.raises(ValueError, match=r"r2m_head.safetensors: q_proj.weight has shape \(6, 24\); the head's config "
                                         r"\(attn_dim=12, num_heads=3, .*\) gives \(12, 24\)$"):
        R2MRewardModel.from_pretrained(tmp_path)
    settings["format_version"] = 2
    (tmp_path / "r2m_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="r2m_config.json has format_version 2; this r2m reads 1"):
        R2MRewardModel.from_pretrained(tmp_path)


def test_score_lays_out_pairs_as_trl_lays_out_a_generated_batch(tok):
    """score(): the prompt through the policy tokenizer's chat template (generation prompt
    added), left-padded; the completion's tokens plus EOS where it ended, right-padded; one
    forward of the policy's backbone, whose hidden states the head reads (mode r2m), or none
    (mode static: the RM's own reward)."""
    from r2m.experiment.tiny import tiny_policy

    policy = tiny_policy(tok, hidden_size=16)
    backbone, score = tiny_reward_backbone(tok)
    rm = R2MRewardModel(backbone, score, 16, tokenizer=tok, config=R2MConfig(attn_dim=8))
    seen = []
    policy.model.register_forward_hook(lambda m, a, kw, out: seen.append((kw["input_ids"], kw["attention_mask"])),
                                       with_kwargs=True)
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "10+20="}]]
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "30!"}]]
    rewards = rm.score(policy, tok, prompts, completions, omega=0.5, ended=[True, False])
    ids, mask = seen[0]
    texts = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    assert texts == ["<u>1+2=</s><a>3</s>", "<u>10+20=</s><a>30!"]
    assert mask.tolist() == [[0, 0] + [1] * 9 + [0], [1] * 12]
    rte = rm.compute_rte(*rm.rm_inputs(prompts, completions))
    hidden = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(rewards, rm(rte, hidden, mask=mask, omega=0.5))
    static = R2MRewardModel(backbone, score, 16, tokenizer=tok, config=R2MConfig(mode="static"))
    seen.clear()
    torch.testing.assert_close(static.score(policy, tok, prompts, completions), static.static_reward(rte))
    assert not seen
    # head_attends="completion": the head reads the completion's columns only (the prompts end at column P)
    completion_only = R2MRewardModel(backbone, score, 16, tokenizer=tok,
                                     config=R2MConfig(attn_dim=8, head_attends="completion"))
    completion_only.head.load_state_dict(rm.head.state_dict())
    width = max(len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
                for p in prompts)
    only = mask.clone()
    only[:, :width] = 0
    torch.testing.assert_close(completion_only.score(policy, tok, prompts, completions, omega=0.5, ended=[True, False]),
                               rm(rte, hidden, mask=only, omega=0.5))


def test_generated_layout_is_trls():
    """generated_layout: left-padded prompts and right-padded completions, to a multiple when
    asked, flagged completions masked out; the same tensors trl's own `pad` builds."""
    from r2m.tokens import generated_layout

    prompts, completions = [[5, 6], [7, 8, 9]], [[10, 2], [11, 12, 13, 14]]
    ids, mask, start = generated_layout(prompts, completions, 0, pad_to_multiple_of=4, masked_completions=[False, True])
    assert start == 4
    assert ids.tolist() == [[0, 0, 5, 6, 10, 2, 0, 0], [0, 7, 8, 9, 11, 12, 13, 14]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    trl_utils = pytest.importorskip("trl.trainer.utils")

    def padded(rows, value, side):
        return trl_utils.pad([torch.tensor(r) for r in rows], padding_value=value, padding_side=side)

    ids, mask, start = generated_layout(prompts, completions, 0)
    assert start == 3
    assert torch.equal(ids, torch.cat([padded(prompts, 0, "left"), padded(completions, 0, "right")], 1))
    ones = [[1] * len(r) for r in prompts], [[1] * len(r) for r in completions]
    assert torch.equal(mask, torch.cat([padded(ones[0], 0, "left"), padded(ones[1], 0, "right")], 1))


@pytest.mark.parametrize("head_attends", ["sequence", "completion"])
def test_head_mask_keeps_the_completion_only_when_asked(head_attends):
    """HeadUpdate.head_mask on TRL's layout (prompt left-padded in columns 0-2, completion right-
    padded from column 3): the mask itself for "sequence"; the completion's valid positions for
    "completion", except in a row whose completion is masked out (a truncated one), which keeps
    its whole mask; the dtype is kept."""
    from r2m import R2MConfig
    from r2m.head_update import HeadUpdate

    rm = R2MRewardModel(torch.nn.Identity(), torch.nn.Linear(6, 1), 5, config=R2MConfig(attn_dim=4))
    update = HeadUpdate(rm, R2MConfig(head_attends=head_attends))
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    got = update.head_mask(mask, 3)
    want = mask if head_attends == "sequence" else torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0],
                                                                 [0, 1, 1, 0, 0, 0]])
    assert torch.equal(got, want) and got.dtype == mask.dtype
