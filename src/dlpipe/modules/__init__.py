"""The Lightning side of the tasks: `modules/<task>.py` holds the LightningModule a task trains
(and its own LightningDataModule where it has one).

Only training (tune, train) loads these, through the task's `module()` and `datamodule()`
(`dlpipe.tasks.<task>`), which import them when called: evaluate and register read the
checkpoint's network alone, so their processes never import Lightning, which costs seconds in
every fresh stage interpreter (issue 13, bench/bench_smoke.py; tests/test_layout.py checks it
for every task). What training and evaluation share lives outside this package, e.g. the
autoencoder's losses in `dlpipe.models.generative`, the translator's BLEU in
`dlpipe.tasks.translator_bleu`.
"""
