"""The trainer: config -> mesh -> data -> model -> optimizer -> checkpoints."""
