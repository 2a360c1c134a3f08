"""The typed config: recipes, overrides, and the errors for bad settings."""

import pytest

from nanogpt.config import ConfigError, parse_config
from nanogpt.train import TrainConfig, gradient_accumulation, learning_rate_at


def test_overrides_are_typed():
    cfg, recipe = parse_config(TrainConfig, ["--n_layer=3", "--learning_rate=1e-3", "--compile=False",
                                             "--target_val_loss=3.28", "--run_dir", "x", "--eval_only"])
    assert recipe is None
    assert cfg.n_layer == 3 and isinstance(cfg.n_layer, int)
    assert cfg.learning_rate == 1e-3
    assert cfg.compile is False
    assert cfg.target_val_loss == 3.28
    assert cfg.run_dir == "x"
    assert cfg.eval_only is True
    assert parse_config(TrainConfig, ["--total_batch_size=524_288"])[0].total_batch_size == 524288
    assert parse_config(TrainConfig, ["--target_val_loss=None"])[0].target_val_loss is None


def test_recipe_then_overrides():
    cfg, recipe = parse_config(TrainConfig, ["tiny_cpu", "--max_iters=7"])
    assert recipe.name == "tiny_cpu.toml"
    assert cfg.n_layer == 2 and cfg.compile is False  # from the recipe
    assert cfg.max_iters == 7  # the command line wins
    assert cfg.beta2 == TrainConfig().beta2  # untouched defaults


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_config(TrainConfig, ["--n_layr=2"])
    message = str(err.value)
    assert "unknown setting --n_layr on the command line; did you mean n_layer?" in message
    assert "learning_rate" in message


@pytest.mark.parametrize("arg, key", [("--n_layer=two", "n_layer"), ("--learning_rate=fast", "learning_rate"),
                                      ("--compile=maybe", "compile"), ("--batch_size=1.5", "batch_size")])
def test_wrong_type_names_the_key(arg, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(TrainConfig, [arg])


@pytest.mark.parametrize("arg, key", [("--lr_schedule=linear", "lr_schedule"), ("--dtype=int8", "dtype"),
                                      ("--n_embd=100", "n_embd"), ("--batch_size=0", "batch_size"),
                                      ("--init_from=gpt3", "init_from"), ("--dropout=1.5", "dropout")])
def test_invalid_values_are_rejected(arg, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(TrainConfig, [arg])


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="no recipe 'no_such_recipe'.*known recipes: .*tiny_cpu"):
        parse_config(TrainConfig, ["no_such_recipe"])
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("n_layer = 2\nlearnig_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="learnig_rate.*bad_key.toml"):
        parse_config(TrainConfig, [str(bad_key)])
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('n_layer = "two"\n')
    with pytest.raises(ConfigError, match="bad_type.toml: n_layer"):
        parse_config(TrainConfig, [str(bad_type)])
    not_toml = tmp_path / "broken.toml"
    not_toml.write_text("n_layer = = 2\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        parse_config(TrainConfig, [str(not_toml)])


def test_every_recipe_parses():
    from nanogpt.config import RECIPE_DIR

    recipes = sorted(RECIPE_DIR.glob("*.toml"))
    assert recipes, "no recipes found"
    for recipe in recipes:
        parse_config(TrainConfig, [str(recipe)])


def test_gradient_accumulation_is_derived_from_tokens():
    cfg = TrainConfig(batch_size=16, block_size=1024, total_batch_size=524288)
    assert gradient_accumulation(cfg, 1) == 32
    assert gradient_accumulation(cfg, 8) == 4
    assert gradient_accumulation(TrainConfig(total_batch_size=0), 4) == 1
    with pytest.raises(ConfigError, match="not a multiple of batch_size\\*block_size\\*world_size = 16\\*1024\\*3"):
        gradient_accumulation(cfg, 3)


def test_cosine_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="cosine")
    lrs = [learning_rate_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup rises
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # then falls
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=100, lr_schedule="wsd", cooldown_frac=0.2)
    lrs = [learning_rate_at(s, cfg) for s in range(101)]
    assert lrs[10] == lrs[79] == 1.0  # stable phase
    assert lrs[90] == pytest.approx(0.5)  # halfway through the linear cooldown
    assert lrs[100] == 0.0
    assert TrainConfig(lr_schedule="constant", warmup_iters=0).learning_rate == learning_rate_at(5000, TrainConfig(lr_schedule="constant", warmup_iters=0))


@pytest.mark.parametrize("module", ["nanogpt.train", "modded_nanogpt.train_gpt"])
def test_help_lists_every_setting_with_its_default_and_description(module):
    """--help prints each setting of the trainer's config dataclass with its default and a description (the
    comment beside its declaration); the speedrun trainer had no --help, the baseline's descriptions were empty."""
    import dataclasses
    import importlib

    from tests.fixtures import run_module

    proc = run_module(module, "--help")
    assert proc.returncode == 0, proc.stderr
    cls = importlib.import_module(module).__dict__["TrainConfig" if module == "nanogpt.train" else "Hyperparameters"]
    lines = proc.stdout.splitlines()
    for f in dataclasses.fields(cls):
        row = next(i for i, line in enumerate(lines) if line.startswith(f"  --{f.name}="))
        assert lines[row + 1].startswith("      ") and len(lines[row + 1].strip()) > 3, (f.name, lines[row + 1])
    assert "--warmup_iters=2000  (int)" in proc.stdout or "--untie_step=-1  (int)" in proc.stdout
    if module == "modded_nanogpt.train_gpt":  # what the two logged training losses are
        assert "train_loss is the next-token cross-entropy" in proc.stdout
        assert "train_mtp_loss is the objective the step minimizes" in proc.stdout


def test_both_trainers_parse_and_explain_settings_with_one_parser():
    """DESIGN.md: a contract of the two trainers is written once. The command line (and --help's text) was
    parsed by two parsers with two grammars; the speedrun now imports nanogpt.config, as the baseline does."""
    from modded_nanogpt import train_gpt
    from nanogpt import config, train

    for module in (train, train_gpt):
        assert module.parse_config is config.parse_config and module.usage is config.usage
        assert module.ConfigError is config.ConfigError
        assert module.trainer_exit_status is config.trainer_exit_status  # the exit statuses of cli()
    assert not hasattr(train_gpt, "field_comments") and not hasattr(train_gpt, "_coerce")


def test_every_command_line_ends_a_bad_input_with_one_line_and_its_status(capsys):
    """The samplers, the checkpoint scorers, the benchmark and the report end as the trainers do (one helper): an
    error of a listed kind is "error: ..." on stderr and its status, any other error propagates."""
    from modded_nanogpt import sample as modded_sample
    from modded_nanogpt import score_checkpoints as modded_score
    from nanogpt import config, sample, score_checkpoints
    from nanogpt.bench import throughput
    from slurm import report

    for module in (sample, modded_sample, score_checkpoints, modded_score, throughput, report):
        assert module.exit_status is config.exit_status, module.__name__

    def bad_setting():
        raise config.ConfigError("lr=-1: must be positive")

    assert config.exit_status(bad_setting, {KeyError: 1, config.ConfigError: 2}) == 2
    assert capsys.readouterr().err == "error: lr=-1: must be positive\n"
    assert config.exit_status(lambda: None, {config.ConfigError: 2}) == 0
    with pytest.raises(ZeroDivisionError):
        config.exit_status(lambda: 1 / 0, {config.ConfigError: 2})


def test_the_samplers_share_their_settings_and_an_inherited_setting_keeps_its_help_text():
    """Both samplers' settings are one dataclass (nanogpt.sample.SamplingSettings) that each extends: --help
    shows the comment where a setting is declared, the subclass's where it declares the setting again."""
    from modded_nanogpt import sample as modded_sample
    from nanogpt import sample
    from nanogpt.config import config_help

    for cls, max_new_tokens in ((sample.SampleConfig, 300), (modded_sample.SampleConfig, 200)):
        assert issubclass(cls, sample.SamplingSettings)
        text = config_help(cls)
        assert "--top_k=200  (int)\n      keep only the k most likely tokens (0 = all)" in text
        assert f"--max_new_tokens={max_new_tokens}  (int)" in text
    assert "--max_new_tokens=200  (int)\n      each token runs the whole sequence again" in config_help(
        modded_sample.SampleConfig)
    assert "--init_from=''  (str)\n      or from Hugging Face GPT-2 weights" in config_help(sample.SampleConfig)


def test_both_trainers_write_and_read_run_directories_and_shards_with_one_module():
    """The run directory, its checkpoints (contracts 3, 4) and the token shards (contract 2) had a second copy in
    the speedrun's package (runlog.py, its loader's header check); both trainers now use nanogpt.rundir and
    nanogpt.data.shards, and the speedrun's package has no run-directory module of its own."""
    import importlib.util

    from modded_nanogpt import sample as modded_sample
    from modded_nanogpt import train_gpt
    from modded_nanogpt.data import cached_fineweb10B, loader
    from nanogpt import checkpoint, rundir, train
    from nanogpt.data import shards

    assert importlib.util.find_spec("modded_nanogpt.runlog") is None
    for name in ("RunDir", "RunDirError", "check_writable", "StopSignal", "check_same_trainer"):
        assert getattr(train, name) is getattr(rundir, name) is getattr(train_gpt, name), name
    for name in ("provenance", "load_newest", "save_checkpoint", "prune_checkpoints"):
        assert getattr(train_gpt, name) is getattr(rundir, name), name
    assert checkpoint.rundir is rundir and train.provenance is rundir.provenance
    assert modded_sample.load_newest is rundir.load_newest
    for name in ("ShardError", "check_token_ids", "find_shards", "read_shard_header"):
        assert getattr(train_gpt, name) is getattr(shards, name), name
    assert loader.read_shard_header is shards.read_shard_header is cached_fineweb10B.read_shard_header
    assert loader.ShardError is shards.ShardError


@pytest.mark.parametrize("trainer", ["baseline", "modded"])
def test_one_grammar_the_recipe_first_and_the_older_recipe_option(trainer):
    """`python -m nanogpt.train RECIPE --k=v` and `python -m modded_nanogpt.train_gpt RECIPE --k=v`; the
    speedrun's older `--recipe=RECIPE` (and `--recipe RECIPE`) still work for both. Two recipes, or a
    positional argument after the first, are errors naming them."""
    from modded_nanogpt.train_gpt import parse_hyperparameters

    if trainer == "baseline":
        parse, key = (lambda argv: parse_config(TrainConfig, argv)[0]), "max_iters"
    else:
        parse, key = parse_hyperparameters, "num_iterations"
    spellings = [["tiny_cpu", f"--{key}=7"], ["--recipe=tiny_cpu", f"--{key}=7"], [f"--{key}", "7", "--recipe", "tiny_cpu"]]
    configs = [parse(argv) for argv in spellings]
    assert configs[0] == configs[1] == configs[2]
    assert getattr(configs[0], key) == 7 and configs[0] != parse([f"--{key}=7"])  # the recipe was read
    with pytest.raises(ConfigError, match="two recipes given \\('tiny_cpu', 'demo'\\)"):
        parse(["tiny_cpu", "--recipe=demo"])
    with pytest.raises(ConfigError, match="unexpected argument 'demo': settings are given as --key=value"):
        parse(["tiny_cpu", "demo"])
    with pytest.raises(ConfigError, match="--recipe needs a value"):
        parse(["--recipe"])
