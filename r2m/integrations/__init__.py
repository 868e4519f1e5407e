"""R2M inside the RL engines people run. `r2m.integrations.trl` (needs `pip install "r2m[trl]"`):
R2MGRPOTrainer and R2MRLOOTrainer."""
