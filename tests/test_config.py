"""The config loads strictly: unknown keys and wrong types are errors naming the key."""
import ast
import dataclasses
import inspect

import pytest

from mmpretrain import config as C
from mmpretrain.config import ConfigError, load


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_job_configs_load():
    from pathlib import Path
    jobs = sorted(Path(__file__).parent.parent.joinpath("jobs").glob("*.yaml"))
    assert jobs
    for job in jobs:
        load(job)
        assert job.read_text().startswith("#"), f"{job} must start with its launch command"


@pytest.mark.parametrize("text, key", [
    ("decoder:\n  hidden_sise: 64\n", "decoder.hidden_sise"),
    ("trian:\n  steps: 3\n", "trian"),
    ("train:\n  steps: three\n", "train.steps"),
    ("train:\n  steps: 2.5\n", "train.steps"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("logging:\n  tensorboard: 1\n", "logging.tensorboard"),
    ("train:\n  precision: fp8\n", "train.precision"),
    ("decoder: 3\n", "decoder"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(write(tmp_path, text))


def test_set_overrides_with_the_same_checks(tmp_path):
    p = write(tmp_path, "train:\n  steps: 3\n")
    cfg = load(p, ["train.steps=7", "train.lr=1e-4", "projector.hidden_size=null",
                   "data.path=/x/y"])
    assert (cfg.train.steps, cfg.train.lr, cfg.data.path) == (7, 1e-4, "/x/y")
    assert cfg.projector.hidden_size is None
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load(p, ["train.stepz=7"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load(p, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load(p, ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.steps\.x"):
        load(p, ["train.steps.x=1"])
    # the override at fault is named, not the one after it
    with pytest.raises(ConfigError, match=r"--set train: 'train' is a section: expected a mapping"):
        load(p, ["train=5", "train.steps=1"])
    with pytest.raises(ConfigError, match=r"--set train.steps: 'train' holds 5 \(from the config"):
        load(write(tmp_path, "train: 5\n"), ["train.steps=1"])
    assert load(p, ["train={steps: 9}"]).train.steps == 9


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    p = write(tmp_path, "train:\n  steps: 3\n   lr: [1\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(e.value) == f"{p}: not valid YAML at line 3, column 6: mapping values are not allowed here"


def test_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match="num_query_groups"):
        load(write(tmp_path, "decoder:\n  num_attention_heads: 4\n  num_query_groups: 3\n"))
    with pytest.raises(ConfigError, match="projector.merge"):
        load(write(tmp_path, "projector:\n  merge: 3\n"))
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("setting, message", [
    ("decoder.ffn_hidden_size=0", r"decoder\.ffn_hidden_size: must be positive"),
    ("vision.ffn_hidden_size=0", r"vision\.ffn_hidden_size: must be positive"),
    ("decoder.num_attention_heads=0", r"decoder\.num_attention_heads: must be positive"),
    ("vision.num_attention_heads=0", r"vision\.num_attention_heads: must be positive"),
    ("decoder.num_query_groups=0", r"decoder\.num_query_groups: must be positive"),
    ("logging.every=0", r"logging\.every: must be positive"),
    ("train.lr=-1", r"train\.lr: must not be negative"),
    ("train.lr=0", r"train\.min_lr 0\.0001 is above train\.lr 0\.0"),
    ("train.min_lr=-1", r"train\.min_lr: must not be negative"),
    ("train.min_lr=0.5", r"train\.min_lr 0\.5 is above train\.lr"),
    ("train.warmup_steps=-5", r"train\.warmup_steps: must not be negative"),
    ("model.init_std=-1", r"model\.init_std: must not be negative"),
    ("checkpoint.every=-1", r"checkpoint\.every: must not be negative"),
    ("checkpoint.keep=-1", r"checkpoint\.keep: must not be negative"),
    ("checkpoint.keep_every=-5", r"checkpoint\.keep_every: must not be negative"),
    ("train.lr=nan", r"train\.lr: must be a finite number"),
    ("data.max_upscale=.inf", r"data\.max_upscale: must be a finite number"),
    ("train.weight_decay=-5", r"train\.weight_decay: must not be negative"),
    ("train.clip_grad=-1", r"train\.clip_grad: must not be negative"),
    ("train.adam_beta2=1", r"train\.adam_beta2: must be in \[0, 1\)"),
    ("vision.rope_theta=0", r"vision\.rope_theta: must be positive"),
    ("projector.hidden_size=0", r"projector\.hidden_size: must be positive \(or null\)"),
    ("decoder.vocab_size=-3", r"decoder\.vocab_size: must be positive \(or null\)"),
    ("data.cache_limit=abc", r"data\.cache_limit: 'abc' is not a size"),
    ("data.cache_limit=-1", r"data\.cache_limit: -1 is negative"),
])
def test_values_out_of_range_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [setting])


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not a UTF-8 text file"):
        load(tmp_path / "bin.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load(None, ["train.steps=11", "vision.freeze=true"])
    C.dump(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(C))
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and dataclasses.is_dataclass(getattr(C, node.name))):
            continue
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                ok = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str)
                assert ok, f"{node.name}.{stmt.target.id} has no docstring"


def test_a_distributed_optimizer_format_without_it_is_an_advisory():
    """checkpoint.optimizer_format only applies to the distributed optimizer: set without it,
    the run starts and says so."""
    from mmpretrain.config import advisories

    sets = ["checkpoint.optimizer_format=fully_reshardable"]
    assert any("checkpoint.optimizer_format" in a for a in advisories(load(None, sets)))
    assert advisories(load(None, [*sets, "parallel.distributed_optimizer=true"])) == []
    assert advisories(load(None, [])) == []
