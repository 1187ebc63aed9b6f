"""aemnist: the science of the study (data, model, training, evaluation, report) as plain
functions; no orchestration here."""

__version__ = "0.1.0"
