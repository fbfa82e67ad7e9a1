"""Every option of every config group composes; `smoke=true` shrinks any composition; and every
experiment in conf/experiment/ runs all six stages at smoke size and registers a model that loads.
New options and experiments are picked up by glob: they are tested for free."""

import re
from pathlib import Path

import mlflow
import pytest
from omegaconf import DictConfig, OmegaConf

from dlpipe.register import baseline_required
from dlpipe.smoke import sized

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "task", "search", "trainer", "experiment")


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def _required(group: str, option: str) -> list[str]:
    """A value for each mandatory (???) key of the option, e.g. the `path` of the user's data.
    The config itself says these can't compose without one."""
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    if group == "experiment":  # an experiment on the user's own data: its data's keys
        picks = [d for d in node.get("defaults", []) if isinstance(d, DictConfig)]
        data = next((d["override /data"] for d in picks if "override /data" in d), None)
        return _required("data", data) if data else []
    return [f"{group}.{k}=mine" for k in node if OmegaConf.is_missing(node, k)]


def _leaves(node, prefix: str) -> set[str]:
    if not isinstance(node, dict):
        return {prefix.rstrip(".")}
    return {leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")}


def test_no_interpolation_reads_a_key_that_stages_change_after_composing():
    """DVC writes params.yaml with `${...}` resolved, and the stages then change keys in code:
    smoke=true merges the tiny sizes, tuning applies its parameters. An interpolation reading
    such a key would keep the stale value under `dvc repro` (register.require_beat_baseline
    once kept the full-size `true` of ${task.require_beat_baseline} at smoke size)."""
    changed = _leaves(OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["tiny"], "")
    for group in ("data", "model", "task"):
        for path in (CONF / "tiny" / group).glob("*.yaml"):
            changed |= _leaves(OmegaConf.to_container(OmegaConf.load(path)), f"{group}.")
    for path in (CONF / "search").glob("*.yaml"):
        leaves = _leaves(OmegaConf.to_container(OmegaConf.load(path)), "")
        # a search leaf is {type: ..., low: ...}: the key it sets is its parent's path
        changed |= {leaf.rsplit(".", 1)[0].split("__")[0] for leaf in leaves}
    reads = {}
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            for key in re.findall(r"\$\{(?:oc\.select:)?([A-Za-z_][\w.]*)", code):
                reads.setdefault(key, []).append(path.relative_to(CONF).as_posix())
    stale = {key: where for key, where in reads.items() if key in changed}
    assert not stale, f"interpolations of keys the stages change in code: {stale}"


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: v
)
def test_every_option_of_every_group_composes_and_resolves(compose_conf, group, option, smoke):
    cfg = sized(compose_conf(f"{group}={option}", *_required(group, option), f"smoke={smoke}"))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert "tiny" not in resolved and resolved["smoke"] is smoke
    if smoke:
        # The common sizes apply to everything; tuning no longer searches what smoke fixed.
        assert resolved["trainer"]["max_epochs"] == resolved["tune"]["max_epochs"] == 1
        assert "batch_size" not in resolved["search"].get("train", {})


def test_smoke_sizes_win_and_are_themselves_configurable(compose_conf):
    full = sized(compose_conf("experiment=shakespeare_gpt"))
    assert (full.model.n_layer, full.data.limit, full.task.steps_per_epoch) == (6, None, 500)
    tiny = sized(compose_conf("experiment=shakespeare_gpt", "smoke=true"))
    assert (tiny.model.n_layer, tiny.data.block_size, tiny.task.steps_per_epoch) == (1, 32, 10)
    assert tiny.model.n_embd % tiny.model.n_head == 0
    # The experiment's own settings that smoke does not size stay as they are.
    assert (tiny.optim.lr, tiny.model.dropout) == (full.optim.lr, full.model.dropout)
    assert set(tiny.search.model) == {"dropout"}  # n_layer and n_embd are fixed at smoke size
    assert set(tiny.search.optim) == set(full.search.optim)
    bigger = sized(compose_conf("experiment=shakespeare_gpt", "smoke=true", "tiny.data.limit=5000"))
    assert bigger.data.limit == 5000


# One run per experiment and session (conftest's smoke_run), shared with the tests of each task,
# which check what that run's served model does: every experiment runs once in the default suite.
@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_runs_all_stages_at_smoke_size(experiment, smoke_run):
    cfg, results, registered = smoke_run(experiment)

    assert results["register"]["model_name"] == cfg.register.model_name
    # Every test metric stands next to a classical baseline's. The gate promoted the model iff it
    # beat chance and, where required, that baseline (at smoke size chance only: conf/tiny/task);
    # a model that does not stays @challenger, with the reason in the decision.
    metrics, metric = results["evaluate"], cfg.register.metric
    suffix = metric.split("/", 1)[1]
    assert f"baseline/{suffix}" in metrics
    floors = [metrics.get(f"chance/{suffix}")]
    if baseline_required(cfg):
        floors.append(metrics[f"baseline/{suffix}"])
    maximize = cfg.register.direction == "maximize"
    value = metrics[metric]
    beats = all(f is None or (value > f if maximize else value < f) for f in floors)
    decision = results["register"]["decision"]
    assert decision == "promoted to champion" if beats else decision.startswith("not promoted")
    # It loads, and serves the input example it was logged with.
    model = mlflow.pyfunc.load_model(str(registered))
    example = model.metadata.load_input_example(str(registered))
    assert example is not None
    params = model.metadata.get_params_schema()
    model.predict(example, params=params and {p.name: p.default for p in params.params})
