"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class DecloraError(Exception):
    """A mistake in what the user asked for (config, data, model, graph), not a bug."""


class ConfigError(DecloraError):
    """The configuration is invalid."""


class TopologyError(DecloraError):
    """The graph or the mixing matrix breaks a requirement of gossip averaging."""


class PartitionError(DecloraError):
    """The data cannot be split over the peers as asked."""


class DataError(DecloraError):
    """A data set cannot be found or does not have the expected shape."""


class ModelError(DecloraError):
    """A model cannot be loaded or does not fit the task."""


class CheckpointError(DecloraError):
    """A checkpoint is missing, damaged or belongs to another run."""
