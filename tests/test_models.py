"""The model registry and conf/: every registered model builds (every predictor runs and learns);
every conf option composes; params.yaml is what conf/ composes to; every search space names real
config keys."""

import inspect
import subprocess
import sys
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from dvc.utils.hydra import compose_and_dump
from omegaconf import OmegaConf

from dlpipe.errors import ConfigError
from dlpipe.models import available_models, create_model, generative_models, register
from dlpipe.models.layers import DeepEnsemble
from dlpipe.models.simple import char_ngram_ids
from dlpipe.modules.classifier import Classifier
from dlpipe.train import to_dict, with_overrides
from dlpipe.tune import suggest

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = available_models()
PREDICTORS = [m for m in MODELS if m not in generative_models()]  # raw inputs -> logits
# per-frame CTC acoustic models over feature sequences: tested in tests/test_transcriber.py
CTC_MODELS = ("crnn", "conv_transformer")
# gpt is a causal language model only; ft_transformer makes each of a row's features a token
# (784 or 3072 tokens per image here): tested on table rows in tests/test_fraud.py; fasttext
# takes token ids only (the padding test below).
IMAGE_MODELS = [
    m for m in PREDICTORS if m not in ("gpt", "ft_transformer", "fasttext", *CTC_MODELS)
]
SMALL = {  # per model: the config keys that shrink it to test size
    "mlp": {"width": 8},
    "cnn": {"width": 8},
    "rnn": {"hidden_size": 8, "embed_dim": 8},
    "lstm": {"hidden_size": 8, "embed_dim": 8},
    "gru": {"hidden_size": 8, "embed_dim": 8},
    "transformer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16},
    "gpt": {"n_embd": 12, "n_head": 2, "n_layer": 1},
    "dcgan": {"latent_dim": 8, "g_width": 8, "d_width": 8},
    "autoencoder": {"width": 8, "latent_dim": 6},
    "vae": {"width": 8, "latent_dim": 6},
    "fasttext": {"embed_dim": 8, "hidden_size": 8, "buckets": 100},
    "ft_transformer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16},
    "plr_mlp": {"frequencies": 4, "embed_dim": 4, "width": 8, "depth": 1},
    "mlp_autoencoder": {"width": 8, "latent_dim": 4},
    "crnn": {"channels": 4, "hidden_size": 8},
    "conv_transformer": {"channels": 4, "d_model": 8, "nhead": 2, "dim_feedforward": 16},
    "seq2seq_transformer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16},
    "seq2seq_rnn": {"embed_dim": 8, "hidden_size": 8},
}
# encoder-decoders over token ids (task=translator): tested in tests/test_translation.py
TRANSLATORS = ("seq2seq_transformer", "seq2seq_rnn")
INPUT_SHAPES = [
    (28, 28),
    (32, 32, 3),
]  # grayscale (H, W) and RGB (H, W, C), as the data stores them
NUM_CLASSES = 7


def _build(model: dict, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """The network a `model:` config section describes, for `input_shape` inputs."""
    kwargs = dict(model)
    channels = input_shape[2] if len(input_shape) == 3 else 1
    if kwargs["name"] in TRANSLATORS:  # source and target token ids in, target logits out
        return create_model(
            kwargs.pop("name"),
            input_shape=(32,),
            input_kind="tokens",
            vocab_size=NUM_CLASSES,
            **kwargs,
        )
    if kwargs["name"] in generative_models():  # built from the image shape alone
        return create_model(kwargs.pop("name"), input_shape=input_shape, **kwargs)
    if kwargs["name"] in CTC_MODELS:  # (frames, mels) features in, per-frame logits out
        return create_model(
            kwargs.pop("name"),
            input_shape=(None, input_shape[1]),
            num_classes=NUM_CLASSES,
            input_kind="features",
            per_step=True,
            **kwargs,
        )
    if kwargs["name"] == "fasttext":  # token ids in, one prediction per text
        return create_model(
            kwargs.pop("name"),
            input_shape=(32,),
            num_classes=NUM_CLASSES,
            input_kind="tokens",
            vocab_size=VOCAB,
            vocab=WORDS,  # the token strings the text_table format gives
            **kwargs,
        )
    if kwargs["name"] == "gpt":  # tokens in, next-token logits out
        return create_model(
            kwargs.pop("name"),
            input_shape=(32,),
            num_classes=NUM_CLASSES,
            input_kind="tokens",
            vocab_size=NUM_CLASSES,
            per_step=True,
            **kwargs,
        )
    return create_model(
        kwargs.pop("name"),
        input_shape=input_shape,
        num_classes=NUM_CLASSES,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        **kwargs,
    )


def _defaults(name: str, **overrides) -> dict:
    """conf/model/<name>.yaml, shrunk to test size."""
    return {
        **OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")),
        **SMALL[name],
        **overrides,
    }


def _batch(input_shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *input_shape), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_model_maps_raw_uint8_to_logits(name, input_shape):
    net = _build(_defaults(name), input_shape).eval()
    x, _ = _batch(input_shape, n=5)
    with torch.inference_mode():
        logits = net(x)  # (B, num_classes)
    assert logits.shape == (5, NUM_CLASSES)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_model_learns_a_fixed_batch(name, input_shape):
    torch.manual_seed(0)
    net = _build(_defaults(name, dropout=0.0), input_shape).train()
    x, y = _batch(input_shape, n=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=str)
@pytest.mark.parametrize("name", generative_models())
def test_generative_model_builds_and_refuses_to_predict(name, input_shape):
    assert sum(p.numel() for p in _build(_defaults(name), input_shape).parameters()) > 0
    kwargs = _defaults(name)
    with pytest.raises(ValueError, match=f"model={name} is a generative network"):
        create_model(kwargs.pop("name"), input_shape=input_shape, num_classes=10, **kwargs)


def test_register_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="model 'cnn' is already registered"):

        @register("cnn")
        def another_cnn(**kwargs):
            raise AssertionError("never built")

    assert "cnn" in available_models()  # the first builder stays


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as err:
        create_model("resnet9000", input_shape=(28, 28), num_classes=10, mean=[0.5], std=[0.2])
    for name in MODELS:
        assert repr(name) in str(err.value)


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


# Keys a group option must set before it composes (`???` in its yaml).
def _required(group: str, option: str) -> list[str]:
    """Overrides an option needs to resolve: a value for each of its mandatory (???) keys,
    e.g. the `path` of the user's own data."""
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    return [f"{group}.{k}=mine" for k in node.keys() if OmegaConf.is_missing(node, k)]


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("model", "trainer", "data") for o in _options(g)],
    ids=lambda v: v,
)
def test_every_conf_option_composes(compose_conf, group, option):
    cfg = compose_conf(f"{group}={option}", *_required(group, option))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # The option's keys, and those config.yaml gives every option of the group (model.members).
    shared = OmegaConf.load(CONF / "config.yaml").get(group) or {}
    assert set(resolved[group]) == set(OmegaConf.load(CONF / group / f"{option}.yaml")) | set(
        shared
    )
    if group == "model":
        # The model's own search space comes with it, and its yaml fits the builder's arguments.
        assert resolved["search"] == OmegaConf.to_container(
            OmegaConf.load(CONF / "search" / f"{option}.yaml")
        )
        _build(resolved["model"], (28, 28))
    if group == "trainer":
        # Passed as they are to lightning.Trainer (see dlpipe.train.fit).
        assert set(resolved["trainer"]) <= set(inspect.signature(L.Trainer).parameters)


def test_data_image_folder_requires_a_path(compose_conf):
    cfg = compose_conf("data=image_folder")
    with pytest.raises(Exception, match="data.path"):
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_every_model_option_is_registered_and_vice_versa():
    assert _options("model") == MODELS
    assert _options("search") == _options("model")
    assert set(SMALL) == set(MODELS)


def test_params_yaml_is_the_default_composition(tmp_path):
    # What `dvc repro` reads: a stale committed copy would silently train with other settings
    # than conf/ says. `dvc exp run -S key=value` rewrites params.yaml with the experiment's
    # composition, which is no drift: then, if conf/ is as committed, the committed copy is
    # what must be conf/'s default composition.
    dumped = tmp_path / "params.yaml"
    compose_and_dump(dumped, str(CONF), None, "config", "", [])
    default = yaml.safe_load(dumped.read_text())
    root = CONF.parent
    workspace = yaml.safe_load((root / "params.yaml").read_text())
    fix = (
        "regenerate it with `dvc exp run --dry` or compose_and_dump('params.yaml', 'conf', None, "
        "'config', '', [])"
    )
    if workspace == default:
        return
    git = ["git", "-C", str(root)]
    conf_as_committed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "conf"]).returncode
    assert conf_as_committed == 0, f"params.yaml is not conf/'s default composition: {fix}"
    committed = subprocess.run(
        [*git, "show", "HEAD:params.yaml"], capture_output=True, text=True, check=True
    ).stdout
    assert yaml.safe_load(committed) == default, f"the committed params.yaml drifted: {fix}"


def _trained_by(model: str) -> str:
    """The task of the first experiment that trains `model` (a search space may tune that task's
    keys, e.g. task.generator_optim.lr), else the default task."""
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])
        chosen = {
            key.removeprefix("override /"): value
            for entry in defaults
            if isinstance(entry, dict)
            for key, value in entry.items()
        }
        if chosen.get("model") == model:
            return chosen.get("task", "classifier")
    return "classifier"


@pytest.mark.parametrize("name", MODELS)
def test_search_space_names_real_config_keys(compose_conf, name):
    cfg = compose_conf(f"model={name}", f"task={_trained_by(name)}")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        params = suggest(study.ask(), to_dict(cfg.search))
        assert params, f"conf/search/{name}.yaml is empty"
        # with_overrides raises KeyError on a key the config does not have.
        trial_cfg = with_overrides(cfg, params)
        for key, value in params.items():
            assert OmegaConf.select(trial_cfg, key) == value
        # Every sampled point builds: the choices are values the builder accepts.
        _build(to_dict(trial_cfg.model), (28, 28))


# --- sequence models: masks ---------------------------------------------------------------

VOCAB, PAD = 50, 0
# The token strings a text_table format would give (fasttext hashes their character n-grams).
WORDS = ["[PAD]", "[UNK]", *(f"w{'o' * (i % 7)}rd{i}" for i in range(2, VOCAB))]
SEQUENCE_MODELS = ["rnn", "lstm", "gru", "transformer"]


def _token_model(name: str, per_step: bool = False, **overrides) -> torch.nn.Module:
    kwargs = _defaults(name, dropout=0.0, **overrides)
    return create_model(
        kwargs.pop("name"),
        input_shape=(24,),
        num_classes=VOCAB if per_step else NUM_CLASSES,
        input_kind="tokens",
        vocab_size=VOCAB,
        pad_id=PAD,
        vocab=WORDS,
        per_step=per_step,
        **kwargs,
    ).eval()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("rnn", {}),
        ("lstm", {"bidirectional": True, "num_layers": 2}),
        ("gru", {"bidirectional": False}),
        ("transformer", {"pooling": "mean"}),
        ("transformer", {"pooling": "cls"}),
        ("fasttext", {"word_ngrams": 3}),
        ("fasttext", {"word_ngrams": 1, "char_ngram_max": 0}),
    ],
    ids=str,
)
def test_padding_never_changes_a_classification(name, overrides):
    torch.manual_seed(0)
    net = _token_model(name, **overrides)
    lengths = [3, 9, 16]
    gen = torch.Generator().manual_seed(1)
    tokens = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    with torch.inference_mode():
        alone = [net(t[None]) for t in tokens]  # each sequence on its own, no padding at all
        for width in (16, 24):  # padded to the longest, and padded further
            batch = torch.full((len(tokens), width), PAD)
            for i, t in enumerate(tokens):
                batch[i, : len(t)] = t
            padded = net(batch)
            for i in range(len(tokens)):
                torch.testing.assert_close(padded[i : i + 1], alone[i], atol=1e-5, rtol=1e-4)


def test_fasttext_character_ngrams_are_shared_by_related_words():
    """ "bored" and "boring" share "<bo", "bor" and "<bor"; the table is the same in every
    process (CRC-32, not Python's salted hash); special tokens get no n-grams."""
    words = ["[UNK]", "bored", "boring", "xyz"]
    table = char_ngram_ids(words, 3, 4, buckets=10**6)
    grams = [set(row[row >= 0].tolist()) for row in table]
    assert table.shape == (4, 6 + 5)  # "<boring>": six 3-grams, five 4-grams
    assert [len(g) for g in grams] == [0, 5 + 4, 6 + 5, 3 + 2]
    assert len(grams[1] & grams[2]) == 3 and not grams[3] & (grams[1] | grams[2])
    script = (
        "from dlpipe.models.simple import char_ngram_ids as f; print(f(['bored'], 3, 4, 10**6))"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.stdout.strip() == str(table[1:2, :9]), other.stderr
    kwargs = _defaults("fasttext")
    del kwargs["name"]
    with pytest.raises(ValueError, match="char_ngram_max=0"):  # no token strings to hash
        create_model(
            "fasttext", input_shape=(8,), num_classes=2, input_kind="tokens", vocab_size=9, **kwargs
        )


def test_fasttext_word_dropout_leaves_out_whole_words_in_training_only():
    """A dropped word goes with its character n-grams and the word n-grams touching it: the
    training forward equals the eval forward of the text with those words made padding."""
    torch.manual_seed(0)
    net = _token_model("fasttext", word_ngrams=2, word_dropout=0.4)
    plain = _token_model("fasttext", word_ngrams=2)
    plain.load_state_dict(net.state_dict())
    x = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(net(x), plain(x), atol=0, rtol=0)  # eval: no dropout
        net.train()
        torch.manual_seed(7)
        trained = net(x)
        torch.manual_seed(7)
        dropped = torch.rand(x.shape) < 0.4
        assert 0 < dropped.sum() < dropped.numel()
        torch.testing.assert_close(trained, plain(x.masked_fill(dropped, PAD)))
    with pytest.raises(ValueError, match="word_dropout=1.0"):
        _token_model("fasttext", word_dropout=1.0)


def test_fasttext_depth_stacks_hidden_layers_and_keeps_one_layer_checkpoints():
    one = _token_model("fasttext")
    assert [k.split(".", 1)[1] for k in one.state_dict() if ".head." in k] == [
        "head.0.weight",
        "head.0.bias",
        "head.3.weight",
        "head.3.bias",
    ]  # the layout of checkpoints saved before depth existed
    deep = _token_model("fasttext", depth=3)
    hidden = [m for m in deep.modules() if isinstance(m, torch.nn.Linear)]
    assert len(hidden) == 4  # three hidden layers and the output layer
    x = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    assert deep(x).shape == one(x).shape
    with pytest.raises(ValueError, match="model.depth=0"):
        _token_model("fasttext", depth=0)


def test_a_deep_ensemble_votes_with_its_members_mean_probabilities():
    ensemble = _token_model("fasttext", members=3)
    front, body = ensemble
    assert isinstance(body, DeepEnsemble) and len(body.members) == 3
    x = torch.randint(2, VOCAB, (5, 12), generator=torch.Generator().manual_seed(4))
    members = body.member_logits(front(x))  # (3, 5, classes)
    assert members.shape == (3, 5, NUM_CLASSES)
    # Each member starts from its own initialization...
    assert not torch.allclose(members[0], members[1])
    # ...and the output's softmax is their mean probability, its argmax their vote.
    torch.testing.assert_close(ensemble(x).softmax(-1), members.softmax(-1).mean(0))
    # A checkpoint rebuilds from the same config, member for member.
    again = _token_model("fasttext", members=3)
    again.load_state_dict(ensemble.state_dict())
    torch.testing.assert_close(again(x), ensemble(x))
    assert len(_token_model("fasttext", members=1)) == 2  # one network: no ensemble around it


def test_each_member_of_a_deep_ensemble_learns_from_its_own_loss_only():
    model = {**_defaults("mlp", dropout=0.0), "members": 2}
    net = {"input_shape": (6,), "num_classes": 3, "input_kind": "features"}
    optim = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").optim)
    module = Classifier(model, net, optim, label_smoothing=0.0)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = module.training_step((x, y), 0)
    first, second = module.net[1].members
    # The value: the members' mean cross-entropy, one network's scale...
    own = [F.cross_entropy(member(x), y) for member in (first, second)]
    torch.testing.assert_close(loss, (own[0] + own[1]).detach() / 2)
    loss.backward()
    together = [p.grad.clone() for p in first.parameters()]
    module.zero_grad()
    # ...the gradient: exactly the member's own, as if it trained alone (under any optimizer).
    F.cross_entropy(first(x), y).backward()
    for a, b in zip(together, (p.grad for p in first.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},  # a regressor's or a fraud detector's one output
        {"num_classes": VOCAB, "per_step": True},  # a language model
    ],
    ids=["one-output", "per-step"],
)
def test_a_deep_ensemble_of_anything_but_a_classifier_is_refused(kwargs):
    model = _defaults("gru", dropout=0.0)
    with pytest.raises(ConfigError, match=r"model.members=3 .* task=classifier only"):
        create_model(
            model.pop("name"),
            input_shape=(24,),
            input_kind="tokens",
            vocab_size=VOCAB,
            members=3,
            **model,
            **kwargs,
        )
    with pytest.raises(ConfigError, match="task=classifier only"):
        create_model("autoencoder", input_shape=(28, 28), members=2, **SMALL["autoencoder"])


@pytest.mark.parametrize("name", ["gpt", "lstm", "gru", "rnn"])
def test_causal_models_never_see_the_future(name):
    torch.manual_seed(0)
    overrides = {} if name == "gpt" else {"bidirectional": False}
    net = _token_model(name, per_step=True, **overrides)
    x = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = net(x)
        assert logits.shape == (2, 24, VOCAB)
        for t in (0, 11, 23):
            changed = x.clone()
            changed[:, t:] = (changed[:, t:] + 7) % VOCAB  # rewrite position t and everything after
            after = net(changed)
            torch.testing.assert_close(after[:, :t], logits[:, :t], atol=0, rtol=0)
            assert not torch.allclose(after[:, t], logits[:, t])  # position t itself does change


def test_models_that_would_see_the_future_refuse_language_modeling():
    with pytest.raises(ValueError, match="bidirectional=false"):
        _token_model("lstm", per_step=True, bidirectional=True)
    with pytest.raises(ValueError, match="model=gpt"):
        _token_model("transformer", per_step=True)
    with pytest.raises(ValueError, match="task=language_model"):
        _token_model("gpt", per_step=False)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_read_feature_sequences(name):
    # e.g. spectrogram frames (B, T, F) or price windows
    kwargs = _defaults(name)
    net = create_model(
        kwargs.pop("name"),
        input_shape=(40, 16),
        num_classes=NUM_CLASSES,
        input_kind="features",
        mean=[0.5] * 16,
        std=[2.0] * 16,
        **kwargs,
    ).eval()
    with torch.inference_mode():
        assert net(torch.randn(3, 40, 16)).shape == (3, NUM_CLASSES)


def test_conditional_search_space_samples_each_branch_its_own_leaves():
    space = {
        "optim": {
            "name": {"type": "categorical", "choices": ["adam", "sgd"]},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-3, "when": {"optim.name": ["adam"]}},
            "lr__sgd": {"type": "float", "low": 0.01, "high": 0.2, "when": {"optim.name": "sgd"}},
            "momentum": {"type": "float", "low": 0.8, "high": 0.9, "when": {"optim.name": "sgd"}},
        }
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        params = suggest(study.ask(), space)
        seen.add(params["optim.name"])
        if params["optim.name"] == "sgd":
            assert set(params) == {"optim.name", "optim.lr", "optim.momentum"}
            assert 0.01 <= params["optim.lr"] <= 0.2
        else:
            assert set(params) == {"optim.name", "optim.lr"}
            assert 1e-4 <= params["optim.lr"] <= 1e-3
    assert seen == {"adam", "sgd"}

    backwards = {"momentum": {**space["optim"]["momentum"]}, "optim": space["optim"]}
    with pytest.raises(ValueError, match="not sampled before it"):
        suggest(study.ask(), backwards)
