"""Loading, merging and the resolved-config round trip of aegis.config."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.config import (GLOBAL_KEYS, KEYS, LOGIN_KEYS, Config, ModelConfig, dump_yaml,
                          from_mapping, load_config, parse_yaml)

from conftest import EXAMPLES


def test_single_model_form_and_defaults():
    config = from_mapping({"model": "m"})
    assert config.models == (ModelConfig(name="m"),)
    assert (config.first_port, config.hf_home, config.platform) == (8000, "/tmp/hf_home", "aurora")
    assert config.port_start is None  # unset: 8000, or free ports for `aegis launch` on local
    assert config.effective_scheduler == "pbs"


def test_multi_model_form_with_name_alias_and_legacy_keys():
    config = from_mapping(parse_yaml(
        "registry_port: 8471\nbench: true\naegis_env: /x\nmodels:\n"
        "  - model: a\n    download_weights: true\n  - name: b\n    instances: 3\n"))
    assert [m.name for m in config.models] == ["a", "b"]
    assert config.models[1].instances == 3
    assert config.ignored_keys == ("registry_port", "bench", "aegis_env",
                                   "models[0].download_weights")


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ninstances: 2\nport_start: 9000\n")
    config = load_config(str(path), {"instances": 4, "walltime": None})
    assert (config.models[0].instances, config.port_start, config.walltime) == (4, 9000, "01:00:00")


def test_unquoted_walltime_stays_a_string():
    # YAML 1.1 would read 01:30:00 as the base-60 integer 5400.
    assert from_mapping(parse_yaml("model: m\nwalltime: 01:30:00\n")).walltime == "01:30:00"
    assert from_mapping(parse_yaml("model: m\nwalltime: 100:00:00\n")).walltime == "100:00:00"


def test_extra_args_as_string_or_list():
    assert from_mapping({"model": "m", "extra_vllm_args": "--a 'b c' --n 5"}).models[0] \
        .extra_vllm_args == ("--a", "b c", "--n", "5")
    assert from_mapping({"model": "m", "extra_vllm_args": ["--max-model-len", 32768]}).models[0] \
        .extra_vllm_args == ("--max-model-len", "32768")


def test_empty_account_counts_as_unset():
    assert from_mapping({"model": "m", "account": ""}).account is None


def test_hf_token_accepted_but_never_in_mapping_or_repr():
    config = from_mapping({"model": "m", "hf_token": "hf_abc"})
    assert config.hf_token == "hf_abc"
    assert "hf_token" not in config.to_mapping() and "hf_abc" not in repr(config)


def test_examples_load():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert load_config(str(path)).models


def test_key_table_covers_every_field():
    config_fields = {f.name for f in dataclasses.fields(Config)} - {"models", "ignored_keys"}
    assert config_fields == {k.name for k in GLOBAL_KEYS + LOGIN_KEYS}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert model_fields == {k.field_name for k in KEYS if k.scope == "model"}


names = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                max_size=20).filter(str.strip)


@settings(max_examples=150, deadline=None)
@given(models=st.lists(st.fixed_dictionaries({
           "model": names, "instances": st.integers(1, 50),
           "tensor_parallel_size": st.sampled_from([1, 2, 3, 4, 6, 12, 24]),
           "model_source": st.one_of(st.none(), names),
           "served_model_name": st.one_of(st.none(), names),
           "extra_vllm_args": st.lists(st.text(max_size=10).filter(lambda s: not re.search("[\\x00\\x80-\\x9f]", s)),
                                       max_size=3)}), min_size=1, max_size=3),
       startup_timeout=st.floats(0.5, 1e5), allow_partial=st.booleans(),
       conda_env=st.one_of(st.none(), names))
def test_to_mapping_round_trips_through_yaml(models, startup_timeout, allow_partial, conda_env):
    config = from_mapping({"models": models, "startup_timeout": startup_timeout,
                           "allow_partial": allow_partial, "conda_env": conda_env})
    assert from_mapping(parse_yaml(dump_yaml(config.to_mapping()))) == config


def test_docs_config_reference_lists_every_key_and_flag():
    from conftest import ROOT

    text = (ROOT / "docs" / "config.md").read_text()
    for key in KEYS:
        assert f"| `{key.name}` |" in text, key.name
        assert key.flag in text, key.flag


@pytest.mark.parametrize("platform,expected", [
    ("aurora", "/tmp/hf_home"), ("polaris", "/local/scratch/hf_home"),
    ("frontier", "/mnt/bb/$USER/hf_home"),
])
def test_hf_home_defaults_to_the_platforms_node_local_storage(platform, expected):
    assert load_config(None, {"model": "m", "platform": platform}).hf_home == expected
    assert load_config(None, {"model": "m", "platform": platform,
                              "hf_home": "/x"}).hf_home == "/x"


def test_a_dot_and_underscores_are_text_not_a_broken_float():
    """'._' matched the loader's float pattern and crashed float() (found by the shell-safety
    fuzz test): now the pattern wants a digit after the dot, as PyYAML's own does."""
    from aegis.config import parse_yaml

    assert parse_yaml("account: ._\nqueue: .5\n") == {"account": "._", "queue": 0.5}
