"""Training: the batched and reference engines, the plan of an algorithm, the round loop
and the engine state a checkpoint holds."""
