"""Preference and reinforcement learning on deltas over one frozen base: `reference()` (every delta
off, checked), reward models, preference losses (DPO, IPO, KTO, ORPO), PPO and GRPO."""
