"""Reinforcement learning (Kimi k1.5 online policy mirror descent): rewards, objective, problem sampling."""
