"""Training: DMP wrapping (:mod:`.distributed`), sharding plans (:mod:`.planner`), optimizers,
checkpoints and the trainer loop (:mod:`.trainer`)."""
