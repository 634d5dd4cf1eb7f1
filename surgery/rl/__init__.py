"""Preference and reinforcement learning on deltas over one frozen base: `reference()` (every delta
off, checked), reward models, preference losses (DPO, IPO, KTO, ORPO), PPO and GRPO."""

from surgery.rl.data import encode, pad_id_of
from surgery.rl.dpo import DPOLoss, pair_loss, preference_accuracy, preference_margins, train_dpo
from surgery.rl.grpo import GRPO
from surgery.rl.logprobs import label_logprobs, logprobs, token_logprobs
from surgery.rl.losses import dpo_loss, ipo_loss, kto_loss, orpo_loss
from surgery.rl.ppo import PPO
from surgery.rl.reference import ReferenceCheck, ReferenceCheckError, reference
from surgery.rl.reward import RewardModel, reward_accuracy, train_reward

__all__ = [
    "DPOLoss",
    "GRPO",
    "PPO",
    "ReferenceCheck",
    "ReferenceCheckError",
    "RewardModel",
    "dpo_loss",
    "encode",
    "ipo_loss",
    "kto_loss",
    "label_logprobs",
    "logprobs",
    "orpo_loss",
    "pad_id_of",
    "pair_loss",
    "preference_accuracy",
    "preference_margins",
    "reference",
    "reward_accuracy",
    "token_logprobs",
    "train_dpo",
    "train_reward",
]
