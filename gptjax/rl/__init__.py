"""RL from feedback: rollouts (`rollout.py`), advantages (`advantages.py`: GAE, group-normalised,
whitening) and KL (`kl.py`: estimators and β controllers). The losses are in `losses/policy.py`
and `losses/dpo.py`; the stage runners in `stages/rl.py` and `stages/dpo.py`."""
