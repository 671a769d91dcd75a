"""Training: one loop for pretraining and fine-tuning, with exact resume and data parallelism.

- `loop.train(model, batch_fn, cfg, env=..., seed=..., loss_fn=..., evaluate_fn=..., checkpoint_dir=...)`: fixed steps,
  pluggable batches and loss, callbacks; resumes from the newest matching checkpoint.
- `optim`: AdamW (fused where available, decay on matrices only) and the lr schedules (cosine, WSD, constant).
- `checkpoint`: atomic, verified checkpoint directories; stale and corrupt ones are set aside, never resumed.
- `distributed`: torchrun process groups, DDP or FSDP2 wrapping.
- `launch`: a multi-process stage starts its own workers (torch's elastic launcher), and their fault handling.
- `split`: on CPU, each micro-batch as parts running at once on threads of their own, gradients added in order.
- `compile`: torch.compile of the transformer blocks where it pays.
- `runtime`: device, precision, seeds, RNG state, the GPU's peak FLOP/s.
"""
