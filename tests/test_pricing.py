"""The price table: loading, checking, snapshot names and the cost formula."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from llmwatch.calls import CallTracker
from llmwatch.errors import ApiError, ConfigError
from llmwatch.metrics import Metrics
from llmwatch.pricing import ModelPrice, PriceTable, Usage, base_model_name

CONFIG_PRICES = Path(__file__).resolve().parent.parent / "config" / "prices.yaml"
SHIPPED_MODELS = {
    "gpt-4o",
    "gpt-4o-2024-05-13",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
}


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def write_table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_table_loads(table: PriceTable) -> None:
    assert set(table.models) == SHIPPED_MODELS
    assert table.per_tokens == 1_000_000
    assert table.source.startswith("https://")
    assert table.checked
    assert table.models["gpt-4o-mini"] == ModelPrice(
        input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")
    )
    assert table.models["o4-mini"] == ModelPrice(
        input=Decimal("1.10"), cached_input=Decimal("0.275"), output=Decimal("4.40")
    )


def test_shipped_table_matches_config_copy(table: PriceTable) -> None:
    assert PriceTable.load(CONFIG_PRICES).models == table.models


def test_cost_prompt_and_completion(table: PriceTable) -> None:
    # 12 x $0.15/1M + 20 x $0.60/1M = 0.0000138
    assert table.cost("gpt-4o-mini", Usage(12, 20)) == 0.0000138
    # 16 x $2.50/1M + 5 x $10.00/1M = 0.00009
    assert table.cost("gpt-4o", Usage(16, 5)) == 0.00009


def test_cost_cached_tokens(table: PriceTable) -> None:
    usage = Usage(prompt_tokens=1206, completion_tokens=20, cached_tokens=1152)

    # 54 x $0.15/1M + 1152 x $0.075/1M + 20 x $0.60/1M = 0.0001065
    assert table.cost("gpt-4o-mini", usage) == 0.0001065


def test_cost_reasoning_tokens(table: PriceTable) -> None:
    usage = Usage(prompt_tokens=7, completion_tokens=60, reasoning_tokens=40)

    # 7 x $1.10/1M + 60 x $4.40/1M = 0.0002717; the 40 are among the 60.
    assert table.cost("o4-mini", usage) == 0.0002717
    assert table.cost("o4-mini", usage) == table.cost("o4-mini", Usage(7, 60))


def test_cost_unpriced_model(table: PriceTable) -> None:
    assert table.cost("gpt-3.5-turbo", Usage(7, 20)) is None


def test_cost_zero_usage(table: PriceTable) -> None:
    assert table.cost("gpt-4o-mini", Usage()) == 0


def test_cached_input_defaults_to_input(tmp_path: Path) -> None:
    path = write_table(tmp_path, "models:\n  m:\n    input: 2\n    output: 4\n")

    table = PriceTable.load(path)

    assert table.models["m"].cached_input == Decimal("2")
    # 100 prompt tokens, all cached: 100 x $2/1M + 0 = 0.0002
    assert table.cost("m", Usage(100, 0, cached_tokens=100)) == 0.0002


def test_per_tokens_setting(tmp_path: Path) -> None:
    text = "per_tokens: 1000\nmodels:\n  m:\n    input: 0.5\n    output: 1.5\n"

    table = PriceTable.load(write_table(tmp_path, text))

    # 10 x $0.50/1K + 2 x $1.50/1K = 0.008
    assert table.cost("m", Usage(10, 2)) == 0.008


@pytest.mark.parametrize(
    ("snapshot", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-minix", "gpt-4o-minix"),
        ("gpt-4o-mini-foo", "gpt-4o-mini-foo"),
        ("gpt-4o-mini-9999-99-99", "gpt-4o-mini-9999-99-99"),
        ("gpt-4-1399", "gpt-4-1399"),
    ],
)
def test_base_model_name(snapshot: str, base: str) -> None:
    assert base_model_name(snapshot) == base


def test_snapshot_with_own_price(table: PriceTable) -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)

    # The shipped table prices this older snapshot at $5 input and $15
    # output per 1M tokens, unlike gpt-4o at $2.50 and $10.
    assert table.cost("gpt-4o-2024-05-13", usage) == 20.0
    assert table.cost("gpt-4o-2024-08-06", usage) == 12.5


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        pytest.param({"prompt_tokens": -5}, "prompt_tokens=-5", id="negative"),
        pytest.param(
            {"prompt_tokens": 10, "cached_tokens": 5000},
            "cached_tokens=5000 exceeds prompt_tokens=10",
            id="cached-over-prompt",
        ),
        pytest.param(
            {"completion_tokens": 3, "reasoning_tokens": 4},
            "reasoning_tokens=4 exceeds completion_tokens=3",
            id="reasoning-over-completion",
        ),
        pytest.param({"completion_tokens": 1.5}, "completion_tokens=1.5", id="float"),
    ],
)
def test_usage_rejects_impossible(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        Usage(**fields)

    assert fragment in str(caught.value)


def test_price_of_snapshot(table: PriceTable) -> None:
    assert table.price_of("gpt-4o-mini-2024-07-18") == table.models["gpt-4o-mini"]
    assert table.price_of("gpt-4o-2024-08-06") == table.models["gpt-4o"]
    assert table.price_of("gpt-4o-minix") is None
    assert table.price_of("gpt-4o-mini-foo") is None


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-minix", None),
        ("gpt-4o-mini-foo", None),
        ("gpt-3.5-turbo", None),
    ],
)
def test_served_name(table: PriceTable, model: str, label: str | None) -> None:
    tracker = CallTracker(None, Metrics(), table, default_model="gpt-4o-mini")

    assert tracker.served_name(model) == label


def test_resolve_model_rejects_unserved(table: PriceTable) -> None:
    tracker = CallTracker(None, Metrics(), table, default_model="gpt-4o-mini")

    with pytest.raises(ApiError) as caught:
        tracker.resolve_model("gpt-4o-minix")

    assert caught.value.status == 400
    assert caught.value.field == "model"
    assert "'gpt-4o-minix'" in caught.value.message
    assert tracker.resolve_model(None) == ("gpt-4o-mini", "gpt-4o-mini")
    assert tracker.resolve_model("gpt-4o-2024-08-06") == (
        "gpt-4o-2024-08-06",
        "gpt-4o",
    )


GOOD = "  good:\n    input: 1\n    output: 2\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param("models: []\n", ["no 'models' mapping"], id="models-list"),
        pytest.param("- 1\n- 2\n", ["no 'models' mapping"], id="document-list"),
        pytest.param("", ["no 'models' mapping"], id="empty"),
        pytest.param(
            "per_tokens: 0\nmodels:\n" + GOOD,
            ["per_tokens=0", "positive integer"],
            id="per-tokens",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: cheap\n    output: 2\n",
            ["bad.input='cheap'", "number of US dollars"],
            id="not-number",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: true\n    output: 2\n",
            ["bad.input=True", "number of US dollars"],
            id="boolean",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: 1\n    output: -2\n",
            ["bad.output=-2", "must be a finite number, 0 or more"],
            id="negative",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: .nan\n    output: 2\n",
            ["bad.input=nan", "must be a finite number, 0 or more"],
            id="not-a-number",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: 1\n",
            ["bad.output=None"],
            id="missing-output",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad: 5\n",
            ["model 'bad' needs a mapping", "input, cached_input, output"],
            id="entry-not-mapping",
        ),
        pytest.param(
            "models:\n" + GOOD + "  bad:\n    input: 1\n    output: 2\n    outptu: 3\n",
            ["model 'bad'", "outptu", "accepted: input, cached_input, output"],
            id="unknown-field",
        ),
        pytest.param("models: [\n", ["not valid YAML"], id="yaml"),
    ],
)
def test_price_table_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write_table(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        PriceTable.load(path)

    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "good" not in message
    assert "\n" not in message


def test_price_table_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        PriceTable.load(path)

    message = str(caught.value)
    assert str(path) in message
    assert "cannot read" in message
    assert "LLMWATCH_PRICES_FILE" in message
