"""Selecting embedding modules by exact path, `.`-suffix or full-match regex."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amtl_compress.errors import NoMatchingModuleError
from amtl_compress.surgery import SurgeryError, attach_amtl_, find_embedding_modules


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fields = nn.ModuleList([nn.EmbeddingBag(15, 4), nn.EmbeddingBag(25, 4, mode="max")])
        self.proj = nn.Linear(4, 4)


class Model(nn.Module):
    """ModuleDict of tables, a ModuleList inside a nested submodule, a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({"user": nn.Embedding(20, 4), "item": nn.Embedding(30, 4)})
        self.encoder = Encoder()
        self.side = nn.Sequential(nn.Embedding(7, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)


def test_exact_suffix_and_regex_targets() -> None:
    model = Model()
    got = find_embedding_modules(model, ["tables.user", "item", r"encoder\.fields\.\d+", "side.0"])
    assert got == {
        "tables.user": "tables.user",
        "tables.item": "item",
        "encoder.fields.0": r"encoder\.fields\.\d+",
        "encoder.fields.1": r"encoder\.fields\.\d+",
        "side.0": "side.0",
    }
    order = ["tables.user", "tables.item", "encoder.fields.0", "encoder.fields.1", "side.0"]
    assert list(got) == order  # the model's module order


def test_suffix_must_end_on_a_dot_boundary() -> None:
    with pytest.raises(NoMatchingModuleError, match="`ser`"):
        find_embedding_modules(Model(), ["ser"])


def test_regex_must_match_the_whole_path() -> None:
    assert find_embedding_modules(Model(), [r"tables\..*"]) == {
        "tables.user": r"tables\..*",
        "tables.item": r"tables\..*",
    }
    with pytest.raises(NoMatchingModuleError):
        find_embedding_modules(Model(), [r"tables"])  # no `re.search` semantics


def test_invalid_regex_is_a_plain_name() -> None:
    with pytest.raises(NoMatchingModuleError, match=r"`user\[`"):
        find_embedding_modules(Model(), ["user["])


def test_only_embedding_modules_count() -> None:
    with pytest.raises(NoMatchingModuleError, match="`head`"):
        find_embedding_modules(Model(), ["head"])


def test_no_match_error_lists_what_was_asked_and_what_exists() -> None:
    with pytest.raises(NoMatchingModuleError) as info:
        find_embedding_modules(Model(), ["user", "usr", "itm"])
    message = str(info.value)
    assert "\n" not in message
    assert "`usr`, `itm`" in message
    for path in ["tables.user", "tables.item", "encoder.fields.0", "encoder.fields.1", "side.0"]:
        assert f"`{path}`" in message
    assert isinstance(info.value, ValueError)


def test_no_match_error_shows_at_most_ten_paths() -> None:
    model = nn.ModuleDict({f"t{i}": nn.Embedding(3, 2) for i in range(13)})
    with pytest.raises(NoMatchingModuleError, match="`t9`") as info:
        find_embedding_modules(model, ["nope"])
    assert "(and 3 more)" in str(info.value)
    assert "`t10`" not in str(info.value)


def test_model_without_tables() -> None:
    with pytest.raises(NoMatchingModuleError, match="no nn.Embedding"):
        find_embedding_modules(nn.Linear(2, 2), ["x"])


def test_two_targets_on_one_module_raise() -> None:
    with pytest.raises(SurgeryError) as info:
        find_embedding_modules(Model(), ["user", r"tables\.u.*"])
    assert "`tables.user` is matched by both targets `user` and `tables\\.u.*`" in str(info.value)


def test_repeated_target_is_not_a_conflict() -> None:
    assert find_embedding_modules(Model(), ["user", "user"]) == {"tables.user": "user"}


def test_wrapped_table_is_found_at_the_wrapper_path() -> None:
    model = Model()
    attach_amtl_(model, {"user": torch.zeros(20, dtype=torch.long)})
    assert find_embedding_modules(model, [r".*user.*"]) == {"tables.user": r".*user.*"}
