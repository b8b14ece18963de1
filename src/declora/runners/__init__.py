"""Running a job: one builder for both modes, the simulation (`declora run`), one peer per
process (torchrun / `declora launch`), checkpoints, run directories, sweeps."""
