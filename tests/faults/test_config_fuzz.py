"""Random and mutated configs: each one loads or raises ConfigError, never anything else."""

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelerated_trainer.config import ConfigError, TrainerConfig, load_config

from conftest import REPO

BASE = json.loads((REPO / "configs" / "digits.json").read_text())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def paths(node, prefix=()):
    """Every key path of a nested dict, parents included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from paths(value, prefix + (key,))


def loads_or_config_error(config, overrides=()):
    try:
        assert isinstance(load_config(config, list(overrides)), TrainerConfig)
    except ConfigError as err:
        assert str(err).strip(), "a config error always says what is wrong"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_configs(data):
    config = copy.deepcopy(BASE)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(list(paths(config)) or [("x",)]))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict):
            continue
        operation = data.draw(st.sampled_from(["set", "delete", "add"]))
        if operation == "set":
            parent[path[-1]] = data.draw(json_values)
        elif operation == "delete":
            parent.pop(path[-1], None)
        else:
            parent[data.draw(st.text(max_size=10))] = data.draw(json_values)
    loads_or_config_error(config)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_random_documents(document):
    loads_or_config_error(document)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_random_command_line_overrides(overrides):
    loads_or_config_error(copy.deepcopy(BASE), overrides)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_as_a_config_file(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(raw)
    loads_or_config_error(path)
