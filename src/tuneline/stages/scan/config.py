"""`scan` has no params section of its own: it reads the `datasets` list (`tuneline.config.DatasetConfig`,
each data set's folder) and `ingest.workers` (threads that hash new files)."""

# The params.yaml keys the stage reads (dvc.yaml lists `datasets`; workers do not shape the output).
PARAMS = ("datasets", "ingest.workers")
