"""Training input: ImageFolder trees, webdataset shards and their stream, augmented views,
remote (gs://) I/O and the generated demo sets."""
