"""Hyperparameter and schedule search with Ray Tune; every trial is a ``training`` run. The driver
(``driver``), the search space, schedulers and trial resources (``search``), one trial (``trial``),
and the results table, best-model export and pruning (``results``)."""
