"""Who talks to whom and how: topologies and mixing matrices, per-round schedules, the
combine rules, compression, and the simulated and torch.distributed transports."""
