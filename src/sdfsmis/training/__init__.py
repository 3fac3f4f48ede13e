"""Parts of the training stage (``sdfsmis.train`` holds the loop): config, sampling, checkpoints, EMA, records."""
