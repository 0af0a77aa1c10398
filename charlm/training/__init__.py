"""Training: the LightningModule (`module.CharLM`), the builder (config -> data module, CharLM, trainer), the
budget clock and its schedules, callbacks, run folders, gradient statistics."""
