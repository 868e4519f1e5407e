"""R2MTrainer: an RLOO/GRPO policy-gradient loop whose reward model is realigned every step
(DESIGN §1.4)."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .config import R2MConfig
from .loss import GREBTLoss
from .reward_model import R2MRewardModel, position_ids_from_mask
from .schedule import omega as omega_schedule

CHECKPOINT_FILES = ("policy.safetensors", "head.safetensors", "trainer_state.pt")


def policy_token_loss(logp, old_logp, ref_logp, advantages, response_mask, clip_eps: float, kl_coef: float):
    """The per-token policy loss (B, R), zero where response_mask is 0: kl_coef times the k3
    estimate of KL(pi || pi_ref) minus the clipped importance-ratio surrogate,
    min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) with ratio = pi / pi_old.

    logp (B, R) the policy's log-probs of the response tokens (the only input with a graph);
    old_logp, ref_logp (B, R) pi_old's and the reference policy's; advantages (B,), one per
    sequence; response_mask (B, R) 1 on response tokens. fp32 in the trainer (any float dtype works).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: unbiased, >= 0 (Schulman's approximation)
    return (kl_coef * kl - surrogate) * response_mask


@dataclass
class Rollout:
    """One step's samples: n*K rows, grouped by prompt (rows g*K .. g*K+K-1 share a prompt).
    input_ids/attention_mask (B, P+R): left-padded prompt then response; response_mask (B, R)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompts: list
    responses: list


class R2MTrainer:
    """Trains `policy` against `reward_model` (an R2MRewardModel) on `prompts` (user messages).

    Per step: n prompts x K samples (HF generate); a no-grad forward gives pi_old's log-probs and
    the policy's last-layer hidden states; the reward comes from the mode (R2M head or the plain
    RM); RLOO or GRPO advantages; `policy_epochs` epochs of the clipped importance-ratio loss
    with a k3 KL penalty to the frozen reference policy (a copy of the initial policy unless
    given); then the R2M update: the group rewards recomputed from the last epoch's hidden
    states (captured by a hook on the decoder, detached: no extra policy pass) and one GREBT
    step on the head. `judge(prompt, response) -> float`, when given, supplies a gold reward
    for the metrics only. Construction seeds torch's global RNG with config.seed (sampling and
    noise draw from it; checkpoints save and restore it).
    """

    def __init__(self, config: R2MConfig, policy, tokenizer, reward_model: R2MRewardModel, prompts, *,
                 judge=None, ref_policy=None):
        config.validate()
        self.config, self.tokenizer, self.judge = config, tokenizer, judge
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("prompts is empty")
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.policy = policy.to(self.device).eval()
        self.ref_policy = (ref_policy if ref_policy is not None else copy.deepcopy(policy))
        self.ref_policy.to(self.device).eval().requires_grad_(False)
        self.rm = reward_model.to(self.device)
        self.rm.head.backend = config.head_backend
        self.decoder = self.policy.get_decoder()
        self._set_trainable()
        self.policy_optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                                  lr=config.policy_lr)
        self.head_optimizer = torch.optim.AdamW(self.rm.head.parameters(), lr=config.head_lr)
        loss_backend = "auto" if config.head_backend == "eager" else config.head_backend
        self.grebt = GREBTLoss(alpha=config.grebt_alpha, backend=loss_backend)
        self.pad_id, self.eos_ids = self._special_ids(tokenizer)
        self.prompt_ids = [self._encode_prompt(p) for p in self.prompts]
        self.output_dir = Path(config.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.step = 0
        self.history: list[dict] = []

    # setup -------------------------------------------------------------------------------------

    def _set_trainable(self) -> None:
        n = self.config.train_last_layers
        if n is None:
            return
        layers = getattr(self.decoder, "layers", None)
        if layers is None:
            raise ValueError(f"train_last_layers needs a decoder with .layers; {type(self.decoder).__name__} has none")
        self.policy.requires_grad_(False)
        for module in list(layers)[-n:] + [getattr(self.decoder, "norm", None)]:
            if module is not None:
                module.requires_grad_(True)

    @staticmethod
    def _special_ids(tokenizer):
        eos = tokenizer.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        return pad, eos_ids

    def _encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        # bf16 only (config.AMP_DTYPES): fp16 would need a GradScaler
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def prompt_indices(self, step: int) -> list[int]:
        """The prompts of `step`: consecutive slices of a seeded shuffle of the prompt list, a new
        shuffle per pass. A function of the step, so a resumed run sees the same prompts."""
        n, total = self.config.prompts_per_step, len(self.prompts)
        indices = []
        for position in range(step * n, step * n + n):
            epoch, offset = divmod(position, total)
            order = torch.randperm(total, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
            indices.append(int(order[offset]))
        return indices

    # rollout -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, indices: list[int]) -> Rollout:
        cfg, k = self.config, self.config.samples_per_prompt
        rows = [self.prompt_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        prompt = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt)
        for i, r in enumerate(rows):  # left padding: every response starts at column `width`
            prompt[i, width - len(r):] = torch.tensor(r)
            prompt_mask[i, width - len(r):] = 1
        prompt, prompt_mask = prompt.to(self.device), prompt_mask.to(self.device)
        sampling = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                    max_new_tokens=cfg.max_new_tokens, num_return_sequences=k,
                                    pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        with self._autocast():
            out = self.policy.generate(input_ids=prompt, attention_mask=prompt_mask, generation_config=sampling)
        response = out[:, width:]
        is_eos = torch.isin(response, torch.tensor(self.eos_ids, device=response.device))
        # valid: everything up to and including the first EOS (pad may equal EOS, so ids can't tell)
        response_mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()
        attention_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], dim=1)
        texts = self.tokenizer.batch_decode(response.masked_fill(response_mask == 0, self.pad_id),
                                            skip_special_tokens=True)
        prompts = [self.prompts[i] for i in indices for _ in range(k)]
        return Rollout(out, attention_mask, response_mask, prompts, texts)

    def _micro_batches(self, batch: int):
        size = self.config.micro_batch_size or batch
        return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]

    def _token_logprobs(self, model, input_ids, attention_mask, response_len: int, capture: bool):
        """log pi(response token) (B, R) fp32 at the sampling temperature, and, when `capture`,
        the decoder's last hidden state (B, S, D_p), detached, from this very forward."""
        captured = {}

        def keep_last_hidden(module, args, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            captured["hidden"] = hidden.detach()

        hook = self.decoder.register_forward_hook(keep_last_hidden) if capture else None
        try:
            with self._autocast():
                out = model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask),
                            logits_to_keep=response_len + 1, use_cache=False)
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[:, :-1].float() / self.config.temperature
        targets = input_ids[:, -response_len:]
        logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return logp, captured.get("hidden")

    @torch.no_grad()
    def _reference_pass(self, rollout: Rollout):
        """pi_old log-probs + hidden states (policy) and reference log-probs, no grad."""
        old, ref, hidden = [], [], []
        r = rollout.response_mask.shape[1]
        for sl in self._micro_batches(rollout.input_ids.shape[0]):
            ids, mask = rollout.input_ids[sl], rollout.attention_mask[sl]
            logp, h = self._token_logprobs(self.policy, ids, mask, r, capture=True)
            old.append(logp)
            hidden.append(h)
            ref.append(self._token_logprobs(self.ref_policy, ids, mask, r, capture=False)[0])
        return torch.cat(old), torch.cat(ref), torch.cat(hidden)

    # rewards -----------------------------------------------------------------------------------

    def head_input(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the head attends to: the hidden states, or in `noise` mode Gaussian noise with
        their per-feature mean and standard deviation over valid positions."""
        if self.config.mode != "noise":
            return hidden
        valid = hidden[attention_mask.bool()].float()
        noise = torch.randn(hidden.shape, device=hidden.device) * valid.std(0) + valid.mean(0)
        return noise.to(hidden.dtype)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        groups = rewards.view(-1, self.config.samples_per_prompt)
        if self.config.advantage == "rloo":  # r_i minus the mean of the other K-1
            k = groups.shape[1]
            adv = (groups - groups.mean(1, keepdim=True)) * k / (k - 1)
        else:
            adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + 1e-6)
        return adv.reshape(-1)

    # updates -----------------------------------------------------------------------------------

    def _policy_update(self, rollout: Rollout, old_logp, ref_logp, advantages):
        """`policy_epochs` epochs, one optimizer step each (micro-batches accumulate). Returns the
        last epoch's mean loss and its hidden states (detached)."""
        cfg = self.config
        response_mask = rollout.response_mask.float()
        n_tokens = response_mask.sum().clamp(min=1)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        r = response_mask.shape[1]
        for epoch in range(cfg.policy_epochs):
            last_epoch = epoch == cfg.policy_epochs - 1
            self.policy_optimizer.zero_grad(set_to_none=True)
            total, hidden = 0.0, []
            for sl in self._micro_batches(rollout.input_ids.shape[0]):
                logp, h = self._token_logprobs(self.policy, rollout.input_ids[sl], rollout.attention_mask[sl],
                                               r, capture=last_epoch)
                # normalised by the whole batch's token count, so micro-batches add up to the batch mean
                loss = policy_token_loss(logp, old_logp[sl], ref_logp[sl], advantages[sl], response_mask[sl],
                                         cfg.clip_eps, cfg.kl_coef).sum() / n_tokens
                loss.backward()
                total += loss.item()
                if last_epoch:
                    hidden.append(h)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.policy_optimizer.step()
        return total, torch.cat(hidden)

    def _r2m_update(self, rte, hidden, attention_mask, omega: float):
        """GREBT on the group rewards recomputed with the refreshed hidden states; a step on the
        head only when the mode trains it. Returns the loss (None in static mode)."""
        if self.config.mode == "static":
            return None
        head_in = self.head_input(hidden, attention_mask)
        with torch.set_grad_enabled(self.config.trains_head):
            rewards = self.rm(rte, head_in, mask=attention_mask, omega=omega)
            loss = self.grebt(rewards, self.config.samples_per_prompt)
        if self.config.trains_head:
            self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.head_optimizer.step()
        return loss.item()

    # one step ------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One RL step (DESIGN §1.4). Its metrics: proxy_reward (what the policy optimised: the
        R2M reward, or the RM's in static mode), rm_reward (the original RM's, every mode),
        gold_reward (the judge's; None without one), kl (mean over sequences of the summed
        log pi_old - log pi_ref over response tokens: the k1 estimate, which can dip below 0),
        response_length (tokens, EOS included), policy_loss (last epoch), r2m_loss (GREBT on the
        refreshed hidden states; None in static mode), omega (None in static mode), and
        wall-clock ms of generation, reward (RTE + scoring), the policy step (the no-grad
        pi_old/reference passes and the epochs) and the R2M update (None in static mode)."""
        cfg, t = self.config, self.step
        self.rm.train(cfg.trains_head)
        omega = omega_schedule(t, cfg.steps, cfg.omega_floor)
        t0 = self._clock()
        rollout = self.generate(self.prompt_indices(t))
        t1 = self._clock()
        old_logp, ref_logp, hidden = self._reference_pass(rollout)
        t2 = self._clock()
        rm_ids, rm_mask = self.rm.rm_inputs(rollout.prompts, rollout.responses, input_ids=rollout.input_ids,
                                            attention_mask=rollout.attention_mask, policy_tokenizer=self.tokenizer)
        with self._autocast():
            rte = self.rm.reward_token_embeddings(rm_ids, rm_mask)
        rm_reward = self.rm.static_reward(rte)
        if cfg.mode == "static":
            proxy = rm_reward
        else:
            with torch.no_grad():
                proxy = self.rm(rte, self.head_input(hidden, rollout.attention_mask),
                                mask=rollout.attention_mask, omega=omega)
        t3 = self._clock()
        policy_loss, hidden = self._policy_update(rollout, old_logp, ref_logp, self.advantages(proxy))
        t4 = self._clock()
        r2m_loss = self._r2m_update(rte, hidden, rollout.attention_mask, omega)
        t5 = self._clock()
        self.step += 1
        mask = rollout.response_mask.float()
        metrics = {
            "step": t,
            "mode": cfg.mode,
            "omega": None if cfg.mode == "static" else omega,
            "proxy_reward": proxy.mean().item(),
            "rm_reward": rm_reward.mean().item(),
            "gold_reward": (sum(self.judge(p, r) for p, r in zip(rollout.prompts, rollout.responses))
                            / len(rollout.responses)) if self.judge is not None else None,
            "kl": ((old_logp - ref_logp) * mask).sum(-1).mean().item(),
            "response_length": mask.sum(-1).mean().item(),
            "policy_loss": policy_loss,
            "r2m_loss": r2m_loss,
            "generate_ms": (t1 - t0) * 1e3,
            "reward_ms": (t3 - t2) * 1e3,
            "policy_step_ms": ((t2 - t1) + (t4 - t3)) * 1e3,
            "r2m_update_ms": (t5 - t4) * 1e3 if r2m_loss is not None else None,
        }
        self.history.append(metrics)
        return metrics

    def train(self) -> list[dict]:
        """Steps from the current step (0, or the checkpoint's) to config.steps; metrics to
        output_dir/metrics.jsonl (one line per step); with config.checkpoint, a checkpoint every
        save_every steps and at the end. Returns this trainer's metrics."""
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"r2m {cfg.mode}")
        with bar, open(self.metrics_path, "a") as log:
            while self.step < cfg.steps:
                m = self.train_step()
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix({k: f"{m[k]:.3g}" for k in ("proxy_reward", "gold_reward", "kl", "response_length")
                                 if m[k] is not None})
                if cfg.checkpoint and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        if cfg.checkpoint:
            self.save_checkpoint()
        return self.history

    def _truncate_metrics(self) -> None:
        """Keep only the lines of steps before the current one: a fresh run starts an empty file,
        a resumed run drops lines written after its checkpoint."""
        kept = []
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    # checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, path=None) -> Path:
        """Weights as safetensors (policy, head), optimizers + step + RNG in trainer_state.pt.
        Written to PATH.tmp, then the current checkpoint moves to PATH.old, PATH.tmp to PATH, and
        PATH.old is deleted: at every instant PATH or PATH.old is complete, and load_checkpoint
        falls back to PATH.old when a crash left PATH missing."""
        from safetensors.torch import save_model

        path = Path(path) if path is not None else self.output_dir / "checkpoint"
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.policy, str(tmp / "policy.safetensors"))
        save_model(self.rm.head, str(tmp / "head.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": self.step, "mode": self.config.mode,
                    "policy_optimizer": self.policy_optimizer.state_dict(),
                    "head_optimizer": self.head_optimizer.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
        if _is_complete(path):
            shutil.rmtree(old, ignore_errors=True)  # a crash's leftover: rename() cannot replace it
            path.rename(old)
        else:  # a crash's leftover; PATH.old, if there, is the complete copy and stays until the swap
            shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path=None) -> None:
        """Restore everything save_checkpoint wrote; train() then continues from that step.
        When PATH is missing or incomplete but PATH.old is complete (a crash during a save),
        PATH.old is loaded, with a warning."""
        from safetensors.torch import load_model

        path = Path(path) if path is not None else self.output_dir / "checkpoint"
        if not _is_complete(path):
            old = path.with_name(path.name + ".old")
            if not _is_complete(old):
                missing = [f for f in CHECKPOINT_FILES if not (path / f).exists()]
                raise FileNotFoundError(f"{path} is not a complete checkpoint (missing {missing}) "
                                        f"and neither is {old}")
            warnings.warn(f"{path} is missing or incomplete (a save was interrupted); loading {old}", stacklevel=2)
            path = old
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["mode"] != self.config.mode:
            raise ValueError(f"checkpoint was written in mode {state['mode']!r}, this run is {self.config.mode!r}")
        load_model(self.policy, str(path / "policy.safetensors"), device=str(self.device))
        load_model(self.rm.head, str(path / "head.safetensors"), device=str(self.device))
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]


def _is_complete(path: Path) -> bool:
    """True when the folder holds every file save_checkpoint writes (it writes them into
    PATH.tmp and renames the folder last, so a folder with all of them is whole)."""
    return all((path / f).is_file() for f in CHECKPOINT_FILES)
