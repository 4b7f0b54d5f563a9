"""Command-line config overrides: nested `--config` values arrive as strings and are coerced along
the schema (cohortseg.workflow.overrides), top-level and nested, through the real Snakefile."""
import pytest

from cohortseg.fakebids import make_fake_bids
from cohortseg.errors import ConfigError
from cohortseg.workflow.overrides import SCHEMA, coerce, coerce_config, load_schema, override_hint, validate_config
from helpers import job_counts, snakemake, write_config


def test_coerce_follows_the_schema():
    schema = load_schema()
    cfg = {"inference": {"shard_size": "3", "batch_size": "8"}, "max_voxels": "1000",
           "sc_gm": {"flip_tta": "true", "threshold_native": "0.4", "models": ["gmseg_large"]},
           "brain_tissue": {"wm_target": "null", "brain_mask_range_ml": ["600", "2e3"]},
           "reuse": "False", "bids_dir": "123", "output_dir": "out"}
    got = coerce(cfg, schema)
    assert got["inference"] == {"shard_size": 3, "batch_size": 8} and got["max_voxels"] == 1000
    assert got["sc_gm"] == {"flip_tta": True, "threshold_native": 0.4, "models": ["gmseg_large"]}
    assert got["brain_tissue"] == {"wm_target": None, "brain_mask_range_ml": [600, 2000.0]}
    assert got["reuse"] is False
    assert got["bids_dir"] == "123"  # the schema wants a string: left alone
    # what does not parse stays a string, so validation still names the key
    assert coerce({"inference": {"shard_size": "3.5"}}, schema)["inference"]["shard_size"] == "3.5"
    assert coerce({"sc_gm": {"flip_tta": "maybe"}}, schema)["sc_gm"]["flip_tta"] == "maybe"
    # free-form objects (filters, train_set) are not touched; unknown keys neither
    assert coerce({"sc_gm": {"filters": {"image": {"run": "1"}}}, "nope": "1"}, schema) == \
        {"sc_gm": {"filters": {"image": {"run": "1"}}}, "nope": "1"}
    live = {"inference": {"shard_size": "2"}}
    assert coerce_config(live, schema) is live and live["inference"]["shard_size"] == 2


def _walk(node):
    yield node
    for v in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()):
        yield from _walk(v)


@pytest.mark.parametrize("cfg", [
    {"bids_dir": "b", "output_dir": "o"},
    {"bids_dir": "b", "output_dir": "o", "pipelines": ["sc_gm", "wmh"], "inference": {"shard_size": 3},
     "sc_gm": {"flip_tta": True}, "wmh": {"method": "shiva"}, "body_part": {"route": False}},
])
def test_cluster_jobs_get_the_same_defaults_without_validating(cfg):
    """A cluster job (check=False) fills in the schema's defaults by walking the schema; the main
    process validates with jsonschema. Both give what snakemake's own validate-with-defaults gives."""
    import copy

    from snakemake.utils import validate

    schema = load_schema()
    assert not any(k in ("$ref", "anyOf", "oneOf", "allOf", "if", "patternProperties") or
                   (k == "additionalProperties" and isinstance(v, dict))
                   for node in _walk(schema) if isinstance(node, dict) for k, v in node.items())
    theirs = copy.deepcopy(cfg)
    validate(theirs, str(SCHEMA))
    main, remote = validate_config(copy.deepcopy(cfg)), validate_config(copy.deepcopy(cfg), check=False)
    assert main == remote == theirs and main["inference"]["max_shards"] == 250
    assert main != cfg  # defaults were added


def test_validate_config_names_the_key():
    with pytest.raises(ConfigError, match=r"inference/shard_size: 'x' is not of type 'integer'"):
        validate_config({"bids_dir": "b", "output_dir": "o", "inference": {"shard_size": "x"}})


def test_override_hint_shows_the_working_form():
    msg = "ValidationError: 'abc' is not of type 'integer'"
    assert "--config 'inference={\"shard_size\": 3}'" in override_hint(msg)
    assert override_hint("'x' is not one of ['a']") == "'x' is not one of ['a']"


@pytest.fixture()
def fake_cohort(tmp_path, shared_dir):
    bids = make_fake_bids(tmp_path / "bids", 7, contrasts=("T2starw",), session_every=3)  # 10 sessions
    cfg = write_config(tmp_path / "cfg.yaml", bids_dir=str(bids), output_dir=str(tmp_path / "out"),
                       model_dir=str(shared_dir / "models"), pipelines=["sc_gm"])
    return tmp_path, cfg


def test_nested_and_top_level_overrides_on_the_command_line(fake_cohort):
    tmp, cfg = fake_cohort
    res = snakemake(tmp, "-n", "--cores", "1", "--config", 'inference={"shard_size": 3}', "max_voxels=300000000",
                    'sc_gm={"flip_tta": true, "threshold_native": 0.4}', "reuse=false", configfile=cfg)
    # 10 sessions in shards of 3 -> 4 shards
    assert job_counts(res.stdout) == {"prepare": 4, "infer": 4, "finalize": 4, "aggregate": 1, "qc_page": 1, "all": 1}
    res = snakemake(tmp, "-n", "--cores", "1", "--config", "inference={shard_size: 5}", configfile=cfg)
    assert job_counts(res.stdout)["prepare"] == 2


def test_a_bad_override_is_refused_with_the_working_form(fake_cohort):
    tmp, cfg = fake_cohort
    res = snakemake(tmp, "-n", "--cores", "1", "--config", 'inference={"shard_size": "three"}', configfile=cfg,
                    check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "Job stats" not in res.stdout
    assert "'three' is not of type 'integer'" in text and "inference={\"shard_size\": 3}" in text, text[-3000:]


def test_the_pipelines_read_every_default_from_the_schema():
    """One source for every default: no pipeline module writes a default of its own for a key the
    schema has (``cfg.get("threshold", 0.5)`` once gave wmh 0.5 where the schema says 0.2), and a
    partial section gets the schema's values (filters merged role by role)."""
    import ast
    from pathlib import Path

    from cohortseg.pipelines import REGISTRY
    from cohortseg.schema import defaults, with_defaults

    keys = {k for p in REGISTRY for k in defaults(p)}
    pkg = Path(__file__).resolve().parents[1] / "cohortseg" / "pipelines"
    bad = [f"{f.name}:{n.lineno} cfg.get({n.args[0].value!r}, ...)" for f in sorted(pkg.glob("*.py"))
           for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
           and n.func.attr == "get" and isinstance(n.func.value, ast.Name) and n.func.value.id == "cfg"
           and n.args and isinstance(n.args[0], ast.Constant) and n.args[0].value in keys]
    assert bad == []
    wmh = with_defaults("wmh", {"filters": {"image": {"suffix": "T1w", "acq": "mprage"}}, "min_cluster_voxels": 3})
    assert wmh["threshold"] == 0.2 and wmh["min_cluster_voxels"] == 3 and wmh["interpolation"] == "cubic"
    assert wmh["filters"] == {"image": {"suffix": "T1w", "acq": "mprage"}, "flair": {"suffix": "FLAIR"}}
    assert with_defaults("cmb", {})["threshold"] == 0.5 and with_defaults("sc_gm", None)["threshold_fine"] == 0.999


def test_every_role_has_its_default_filters_in_the_schema():
    """The roles (inputs) of a pipeline and its schema filters are one list: each role's default
    filters live in the schema only."""
    from cohortseg.pipelines import REGISTRY, get_pipeline
    from cohortseg.schema import defaults

    for p in REGISTRY:
        assert set(defaults(p)["filters"]) == set(get_pipeline(p).roles), p
