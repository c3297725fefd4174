"""Training an asymmetric pair: the stages (:mod:`st_daft.training.stages`), the recipe that runs them in order and
records what it did (:mod:`st_daft.training.recipe`), and soups of several runs' query routes
(:mod:`st_daft.training.soup`)."""
