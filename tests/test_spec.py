from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tasks.horizontal.training import RESERVED_PARAMS as training_reserved
from tasks.spec.load import load_spec, parse_spec
from tasks.spec.models import (
    RESERVED_PARAMS,
    SpecError,
    TrainingSpec,
    reserved_param_message,
)


def _data(spec_path: Path) -> dict:
    return tomllib.loads(spec_path.read_text())


def _problems(data: dict, base: str = "/base") -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base=base)
    return [str(p) for p in info.value.problems]


def test_valid_spec_resolves_relative_paths(tiny_table_spec: Path) -> None:
    spec = load_spec(str(tiny_table_spec))
    root = tiny_table_spec.parent
    assert spec.parties[0].store == str(root / "stores" / "a")
    assert spec.parties[0].sources[0].path == str(root / "raw" / "a" / "customers.csv")
    assert spec.coordinator.store == str(root / "stores" / "coordinator")
    assert spec.label_party_ids() == ["a", "b"]


def test_wrong_dtype_names_key_path(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["sources"][1]["columns"]["amount"]["dtype"] = "money"
    problems = _problems(data)
    assert any(p.startswith("parties[1].sources[1].columns.amount.dtype:") for p in problems)


def test_every_problem_is_reported(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][1]["columns"]["timestamp"]["tz"] = "Mars/Olympus"
    data["parties"][0]["sources"][1]["columns"]["amount"]["unit"] = "doubloons"
    data["consortium"]["secret"] = {"env": "X", "block": "y"}
    problems = _problems(data)
    assert any(p.startswith("parties[0].sources[1].columns.timestamp.tz:") for p in problems)
    assert any(p.startswith("parties[0].sources[1].columns.amount.unit:") for p in problems)
    assert any(p.startswith("consortium.secret:") for p in problems)


def test_semantic_problems_have_paths(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    del data["parties"][1]["sources"][0]["columns"]["churned"]  # b no longer holds the label
    data["parties"][0]["sources"][1]["columns"]["category"]["dtype"] = "category"
    del data["vocabularies"]["category"]
    problems = _problems(data)
    assert (
        "parties[1].sources: horizontal layout: party 'b' has no source mapping the label column 'churned'"
        in problems
    )
    assert any(
        p.startswith("parties[0].sources[1].columns.category:") and "vocabularies" in p
        for p in problems
    )


def test_secret_value_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["consortium"]["secret"] = "hunter2"
    problems = _problems(data)
    assert any(p.startswith("consortium.secret") for p in problems)


def test_unknown_key_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][0]["colums"] = {}
    assert any(p.startswith("parties[0].sources[0].colums:") for p in _problems(data))


def test_cli_validate_summary_and_errors(tiny_table_spec: Path, secret: str) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(tiny_table_spec)])
    assert ok.exit_code == 0, ok.output
    assert "consortium 'tiny': horizontal layout" in ok.output
    assert "party b: 2 source(s)" in ok.output
    bad = tiny_table_spec.read_text().replace('dtype = "bool" }', 'dtype = "boolean" }', 1)
    tiny_table_spec.write_text(bad)
    result = runner.invoke(app, ["validate", str(tiny_table_spec)])
    assert result.exit_code == 1
    assert "parties[1].sources[0].columns.churned.dtype: Input should be" in result.output


# --------------------------------------------------------------------------------------
# [training] bounds: each reported with its key path before any training starts
# --------------------------------------------------------------------------------------

BELOW_OR_ZERO = "Input should be greater than or equal to 1"
FINITE = "Input should be a finite number"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_leaves", 1, "Input should be greater than or equal to 2"),
        ("num_leaves", 131_073, "Input should be less than or equal to 131072"),
        ("trees_per_round", 0, BELOW_OR_ZERO),
        ("trees_per_round", 1_000_000, "Input should be less than or equal to 1000"),
        ("rounds", 0, BELOW_OR_ZERO),
        ("rounds", 10**9, "Input should be less than or equal to 10000"),
        ("patience", 0, BELOW_OR_ZERO),
        ("patience", 10**9, "Input should be less than or equal to 1000"),
        ("learning_rate", 0.0, "Input should be greater than 0"),
        ("learning_rate", 1e300, "Input should be less than or equal to 1"),
        ("learning_rate", math.nan, FINITE),
        ("learning_rate", math.inf, FINITE),
        ("min_data_in_leaf", 0, BELOW_OR_ZERO),
        ("min_data_in_leaf", 1_000_001, "Input should be less than or equal to 1000000"),
        ("min_parties", 1001, "Input should be less than or equal to 1000"),
        ("max_trees", 0, BELOW_OR_ZERO),
        ("max_trees", 1_000_001, "Input should be less than or equal to 1000000"),
        ("validation_fraction", math.nan, FINITE),
        ("test_fraction", math.inf, FINITE),
        ("max_seconds", 0.0, "Input should be greater than 0"),
        ("max_seconds", 7 * 24 * 3600.0 + 1, "Input should be less than or equal to 604800"),
        ("max_seconds", math.inf, FINITE),
        ("max_seconds", math.nan, FINITE),
    ],
)
def test_training_bounds(tiny_table_spec: Path, key: str, value: float, message: str) -> None:
    data = _data(tiny_table_spec)
    data.setdefault("training", {})[key] = value
    assert _problems(data) == [f"training.{key}: {message}"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_leaves", 2),
        ("num_leaves", 131_072),
        ("trees_per_round", 1000),
        ("rounds", 10_000),
        ("patience", 1000),
        ("learning_rate", 1.0),
        ("min_data_in_leaf", 1_000_000),
        ("max_trees", 1_000_000),
        ("max_seconds", 7 * 24 * 3600.0),
        ("max_seconds", 0.5),
    ],
)
def test_training_bounds_are_inclusive(tiny_table_spec: Path, key: str, value: float) -> None:
    data = _data(tiny_table_spec)
    data.setdefault("training", {})[key] = value
    spec = parse_spec(data, source="spec.toml", base="/base")
    assert getattr(spec.training, key) == value


def test_max_seconds_defaults_to_no_budget() -> None:
    assert TrainingSpec().max_seconds is None
    assert TrainingSpec(max_seconds=3600).max_seconds == 3600.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"objective": "regression"}, "'objective' is set by fedfuse (the task decides it); remove it"),
        ({"tree_learner": "data"}, "'tree_learner' is set by fedfuse (the training mode decides it); use training.mode instead"),
        ({"eta": 0.3}, "'eta' is set by fedfuse (the round sets it per party); use training.learning_rate instead"),
        ({"n_estimators": 500}, "'n_estimators' is set by fedfuse (the rounds decide it); use training.rounds and training.trees_per_round instead"),
        ({"num_class": 3}, "'num_class' is set by fedfuse (the label decides it); use consortium.label.num_classes instead"),
        ({"num_leaves": 63}, "'num_leaves' is set by fedfuse (the spec has a key for it); use training.num_leaves instead"),
        ({"max_leaves": 63}, "'max_leaves' is set by fedfuse (the spec has a key for it); use training.num_leaves instead"),
        ({"min_child_samples": 5}, "'min_child_samples' is set by fedfuse (the spec has a key for it); use training.min_data_in_leaf instead"),
        ({"random_state": 1}, "'random_state' is set by fedfuse (each party and round gets its own seed); use training.seed instead"),
        ({"monotone_constraints": [1, -1]}, "'monotone_constraints' must be a string, number or boolean, not a list (LightGBM takes a list as a string too, e.g. \"1,-1,0\")"),
        ({"forcedsplits": {"feature": 0}}, "'forcedsplits' must be a string, number or boolean, not a table"),
        ({"lambda_l2": math.nan}, "'lambda_l2' must be a finite number, not nan"),
        ({"lambda_l1": -math.inf}, "'lambda_l1' must be a finite number, not -inf"),
    ],
)  # fmt: skip
def test_training_params_refused_with_key(
    tiny_table_spec: Path, params: dict[str, object], message: str
) -> None:
    data = _data(tiny_table_spec)
    data.setdefault("training", {})["params"] = params
    assert _problems(data) == [f"training.params: {message}"]


def test_every_bad_training_param_is_named(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data.setdefault("training", {})["params"] = {"seed": 1, "lambda_l2": 1.0, "boosting": "dart"}
    assert _problems(data) == [
        "training.params: 'boosting' is set by fedfuse (residual rounds need gbdt); remove it"
        " | 'seed' is set by fedfuse (each party and round gets its own seed); use training.seed"
        " instead"
    ]


def test_training_params_scalars_pass_unchanged(tiny_table_spec: Path) -> None:
    params = {"lambda_l2": 1.5, "max_bin": 63, "extra_trees": True, "monotone_constraints": "1,0"}
    data = _data(tiny_table_spec)
    data.setdefault("training", {})["params"] = params
    spec = parse_spec(data, source="spec.toml", base="/base")
    assert spec.training.params == params
    assert type(spec.training.params["max_bin"]) is int
    assert type(spec.training.params["extra_trees"]) is bool


def test_reserved_params_one_definition() -> None:
    assert training_reserved is RESERVED_PARAMS
    assert {
        "objective",
        "tree_learner",
        "seed",
        "num_leaves",
        "min_data_in_leaf",
    } <= RESERVED_PARAMS
    for key in RESERVED_PARAMS:  # every key has its own message
        assert reserved_param_message(key).startswith(f"{key!r} is set by fedfuse (")


def test_cli_validate_reports_training_bounds(tiny_table_spec: Path) -> None:
    text = tiny_table_spec.read_text()
    assert "[training]" not in text
    tiny_table_spec.write_text(
        text + "\n[training]\nnum_leaves = 1000000\nlearning_rate = nan\n"
        'params = { objective = "regression" }\n'
    )
    result = CliRunner().invoke(app, ["validate", str(tiny_table_spec)])
    assert result.exit_code == 1
    assert "3 problem(s)" in result.output
    assert "training.num_leaves: Input should be less than or equal to 131072" in result.output
    assert "training.learning_rate: Input should be a finite number" in result.output
    assert (
        "training.params: 'objective' is set by fedfuse (the task decides it); remove it"
        in result.output
    )


# --------------------------------------------------------------------------------------
# The consortium secret: at least 128 bits
# --------------------------------------------------------------------------------------

MAKE_ONE = "make one with: python3 -c 'import secrets; print(secrets.token_hex(32))'"


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        ("a", 0),
        ("12345678", 24),
        ("test-secret-0123456789", 88),
        ("a" * 36, 0),
        ("0123456789abcdef0123456789abcde", 124),  # 31 hex characters
        ("Test-Secret-0123456789", 91),  # base64 letters, but not as an encoder writes them
        ("abababababababababababababababab", 32),  # 32 hex characters, 2 distinct
        ("correct horse battery staple", 103),  # 28 characters of text
    ],
)
def test_weak_secret_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str, bits: int
) -> None:
    from storage.secrets import SecretError, resolve_secret

    monkeypatch.setenv("FEDFUSE_SECRET", value)
    with pytest.raises(SecretError) as info:
        resolve_secret(env="FEDFUSE_SECRET")
    message = str(info.value)
    assert message == (
        f"the consortium secret in FEDFUSE_SECRET is too weak (about {bits} bits); {MAKE_ONE}"
    )
    assert "\n" not in message
    if len(value) > 1:
        assert value not in message


@pytest.mark.parametrize(
    "value",
    [
        "0123456789abcdef0123456789abcdef",  # the tests' fixture: 32 hex characters
        "0123456789ABCDEF0123456789ABCDEF",
        "0694bf89c026b705549f120e6467a47491c368ab3e2d87c0a09d2ae8446966b6",  # token_hex(32)
        "AAECAwQFBgcICQoLDA0ODw==",  # base64 of 16 bytes
        "AAECAwQFBgcICQoLDA0ODw",  # unpadded
        "8PHy8_T19vf4-fr7_P3-_w",  # urlsafe, unpadded
        "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=",  # base64 of 32 bytes
        "fedfuse-benchmark-secret-not-for-real-data",  # >= 32 characters, >= 16 distinct
    ],
)
def test_strong_secret_is_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from storage.secrets import resolve_secret

    monkeypatch.setenv("FEDFUSE_SECRET", value)
    assert resolve_secret(env="FEDFUSE_SECRET") == value.encode()


def test_demo_secret_is_strong() -> None:
    import secrets

    from storage.secrets import is_strong_secret

    # flows/cli/app.py draws the demo's secret so; 64 hex characters
    assert all(is_strong_secret(secrets.token_hex(32)) for _ in range(100))


def test_weak_block_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret

    from storage.secrets import SecretError, resolve_secret

    class Weak:
        def get(self) -> str:
            return "hunter2"

    monkeypatch.setattr(Secret, "load", classmethod(lambda cls, name: Weak()))
    with pytest.raises(SecretError) as info:
        resolve_secret(block="consortium")
    assert str(info.value) == (
        f"the consortium secret in Prefect Secret block 'consortium' is too weak (about 19 bits); "
        f"{MAKE_ONE}"
    )
