"""The feedback loop: users rate answers (POST /v1/feedback), ratings are kept in the request's zone
(store), choose among prompt variants (bandit, prompts, variants), and, with the exchanges tenants opted
to keep, become a scrubbed fine-tuning dataset per zone (the keel_feedback DAG)."""
