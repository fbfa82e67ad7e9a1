"""The tune stage's parts: the search space and Optuna's samplers/pruners (`space`), the study's
storage and bookkeeping (`study`), the device pool (`pool`), pruning and time limits inside a
trial (`callbacks`), and several objectives with their Pareto front (`objectives`). The stage,
and the worker loop that calls `train.fit` per trial, is `dlpipe.tune`."""
