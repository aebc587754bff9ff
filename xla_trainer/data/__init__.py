"""Training input: ImageFolder trees, webdataset shards and their stream, augmented views,
remote (gs://) I/O and the generated demo sets."""


def open_data(cfg, runtime):
    """The input of cfg.task, checked before any model is built: the pre-training images (and
    their targets; pretrain.TrainData) or a classifier's labelled train/ and val/ splits
    (eval.EvalData)."""
    # imported here: the shard tools (make-shards, index-shards) import this package and need neither
    if cfg.task == "pretrain":
        from .pretrain import pretrain_data
        return pretrain_data(cfg, runtime)
    from .eval import classifier_data
    return classifier_data(cfg, runtime)
