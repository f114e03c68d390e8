"""attach_amtl_ / detach_amtl on models of unusual layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.errors import NoMatchingModuleError
from amtl_compress.surgery import (
    MaskedEmbedding,
    MaskedEmbeddingBag,
    SurgeryError,
    amtl_layers,
    amtl_parameters,
    attach_amtl_,
    detach_amtl,
    model_parameters,
)


class Fields(nn.Module):
    """A ModuleList of bags inside a nested submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag(15, 4, mode="sum", padding_idx=0), nn.EmbeddingBag(25, 4, mode="max")]
        )


class Recommender(nn.Module):
    """ModuleDict tables, nested ModuleList bags, a Sequential-held table, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(
            {"user": nn.Embedding(20, 4), "item": nn.Embedding(30, 4, padding_idx=0)}
        )
        self.encoder = nn.Module()
        self.encoder.fields = Fields()
        self.side = nn.Sequential(nn.Embedding(7, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.tables["user"](batch["user"]) + self.tables["item"](batch["item"])
        x = x + self.encoder.fields.bags[0](batch["tags"], batch["tag_offsets"], batch["tag_w"])
        x = x + self.encoder.fields.bags[1](batch["genres"])
        x = x + self.side[0](batch["side"])
        return self.head(x).squeeze(-1)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "user": torch.randint(0, 20, (6,), generator=g),
        "item": torch.tensor([0, 3, 29, 0, 5, 6]),
        "tags": torch.randint(0, 15, (14,), generator=g),
        "tag_offsets": torch.tensor([0, 2, 2, 5, 9, 12]),
        "tag_w": torch.rand(14, generator=g),
        "genres": torch.randint(0, 25, (6, 3), generator=g),
        "side": torch.randint(0, 7, (6,), generator=g),
    }


def lookups(model: Recommender, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The output of every table (wrapped or not) plus the model's output."""
    bags = model.encoder.fields.bags
    return [
        model.tables["user"](batch["user"]),
        model.tables["item"](batch["item"]),
        bags[0](batch["tags"], batch["tag_offsets"], batch["tag_w"]),
        bags[1](batch["genres"]),
        model.side[0](batch["side"]),
        model(batch),
    ]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality (torch.equal treats -0.0 and +0.0 as equal)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32}
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x.view(ints[x.dtype]), y.view(ints[y.dtype]))
        for x, y in zip(a, b, strict=True)
    )


#: The unrotated layer: these tests check exact (bitwise) outputs and a max-mode EmbeddingBag.
RAW = AMTLConfig(ordering="none")

SIZES = {"tables.user": 20, "tables.item": 30, "bags.0": 15, "bags.1": 25, "side.0": 7}


def all_counts(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randint(0, 100, (n,), generator=g) for t, n in SIZES.items()}


def make_model(seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    model = Recommender()
    with torch.no_grad():  # negative values too, so sign-of-zero differences would show
        for p in model.parameters():
            p.normal_()
    return model


def scramble_(model: nn.Module) -> None:
    """Give every attached layer random last layers, so rows get various lengths."""
    with torch.no_grad():
        for layer in amtl_layers(model).values():
            for branch in (layer.h_aml, layer.l_aml):
                branch[-1].weight.normal_(0, 2.0)
                branch[-1].bias.normal_(0, 2.0)


def test_attach_wraps_every_layout() -> None:
    model = make_model()
    got = attach_amtl_(model, all_counts(), RAW)
    assert got == {
        "tables.user": "tables.user",
        "tables.item": "tables.item",
        "encoder.fields.bags.0": "bags.0",
        "encoder.fields.bags.1": "bags.1",
        "side.0": "side.0",
    }
    assert isinstance(model.tables["user"], MaskedEmbedding)
    assert isinstance(model.encoder.fields.bags[0], MaskedEmbeddingBag)
    assert isinstance(model.encoder.fields.bags[1], MaskedEmbeddingBag)
    assert isinstance(model.side[0], MaskedEmbedding)
    assert set(amtl_layers(model)) == set(got)
    assert all(isinstance(layer, AMTL) for layer in amtl_layers(model).values())


@pytest.mark.parametrize("training", [False, True])
def test_warm_start_outputs_are_bitwise_identical(training: bool) -> None:
    model = make_model().train(training)
    batch = make_batch()
    before = lookups(model, batch)
    attach_amtl_(model, all_counts(), AMTLConfig(hidden_dims=(8,), ordering="none"))
    model.train(training)
    assert same_bits(lookups(model, batch), before)
    with torch.no_grad():
        assert same_bits(lookups(model, batch), before)


def test_regex_target_shares_its_counts_between_the_tables_it_selects() -> None:
    model = nn.ModuleDict({k: nn.Embedding(5, 2) for k in "ab"} | {"c": nn.Embedding(6, 2)})
    assert attach_amtl_(model, {"a|b": torch.arange(5)}) == {"a": "a|b", "b": "a|b"}
    assert model["a"].amtl is not model["b"].amtl  # one layer per table, never shared
    with pytest.raises(SurgeryError) as info:  # the same counts must fit every selected table
        attach_amtl_(make_model(), {r"tables\.(user|item)": torch.arange(20)})
    assert "target `tables\\.(user|item)` (module `tables.item`) must have shape (30,)" in str(
        info.value
    )


def state_fingerprint(model: nn.Module) -> tuple:
    return (
        [(name, type(m).__name__) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@pytest.mark.parametrize(
    ("bad", "error", "fragment"),
    [
        ({"nope": torch.zeros(3, dtype=torch.long)}, NoMatchingModuleError, "`nope`"),
        (
            {"side.0": torch.zeros(8, dtype=torch.long)},
            SurgeryError,
            "counts for target `side.0` (module `side.0`) must have shape (7,) = "
            "(num_embeddings,), got (8,)",
        ),
        ({"side.0": torch.zeros(7)}, SurgeryError, "integer dtype, got torch.float32"),
        ({"side.0": torch.zeros(7, dtype=torch.bool)}, SurgeryError, "integer dtype"),
        ({"side.0": torch.tensor([0, 1, 2, -3, 4, 5, 6])}, SurgeryError, "minimum of -3"),
        ({"side.0": [0] * 7}, SurgeryError, "must be a torch.Tensor, got list"),
        (
            {
                "side": torch.zeros(7, dtype=torch.long),
                r"side\.0": torch.zeros(7, dtype=torch.long),
            },
            NoMatchingModuleError,
            "`side`",
        ),
    ],
)
def test_bad_request_leaves_model_untouched(bad: dict, error: type, fragment: str) -> None:
    model = make_model()
    names, state = state_fingerprint(model)
    request = {"tables.user": torch.zeros(20, dtype=torch.long), **bad}
    with pytest.raises(error) as info:
        attach_amtl_(model, request)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    names_after, state_after = state_fingerprint(model)
    assert names_after == names
    assert state_after.keys() == state.keys()
    assert all(torch.equal(state[k], state_after[k]) for k in state)


def test_already_wrapped_raises_and_keeps_the_model() -> None:
    model = make_model()
    attach_amtl_(model, {"user": torch.zeros(20, dtype=torch.long)})
    layer = model.tables["user"].amtl
    with pytest.raises(SurgeryError, match="`tables.user` .* already has an AMTL layer"):
        attach_amtl_(
            model,
            {"item": torch.zeros(30, dtype=torch.long), "user": torch.zeros(20, dtype=torch.long)},
        )
    assert model.tables["user"].amtl is layer
    assert isinstance(model.tables["item"], nn.Embedding)


def test_shared_table_and_root_table_raise() -> None:
    shared = nn.Embedding(5, 2)
    model = nn.ModuleDict({"a": shared, "b": shared})
    with pytest.raises(SurgeryError, match="same table as `b`"):
        attach_amtl_(model, {"a": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(SurgeryError, match="the model itself"):
        attach_amtl_(nn.Embedding(5, 2), {".*": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(SurgeryError, match="no targets"):
        attach_amtl_(model, {})


def test_detach_merge_equals_the_masked_forward() -> None:
    model = make_model()
    batch = make_batch(1)
    attach_amtl_(model, all_counts(), RAW)
    scramble_(model)
    model.eval()
    lengths_before = {p: layer.lengths() for p, layer in amtl_layers(model).items()}
    with torch.no_grad():
        masked = lookups(model, batch)
    plain, lengths = detach_amtl(model, merge=True)
    assert plain is model
    with torch.no_grad():
        assert same_bits(lookups(plain, batch), masked)
    assert lengths.keys() == lengths_before.keys()
    for path, row_lengths in lengths.items():
        assert row_lengths.dtype == torch.int64
        assert torch.equal(row_lengths, lengths_before[path])
        weight = plain.get_submodule(path).weight
        dropped = torch.arange(weight.shape[1]) >= row_lengths.unsqueeze(1)
        assert dropped.any()
        assert torch.all(weight[dropped] == 0) and not torch.signbit(weight[dropped]).any()
        assert torch.all(weight[~dropped] != 0)


def test_detach_without_merge_keeps_raw_weights_and_types() -> None:
    model = make_model()
    tables = (nn.Embedding, nn.EmbeddingBag)
    originals = {p: m for p, m in model.named_modules() if isinstance(m, tables)}
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    attach_amtl_(model, all_counts(), RAW)
    scramble_(model)
    plain, lengths = detach_amtl(model, merge=False)
    assert set(lengths) == set(originals)
    for path, module in originals.items():
        assert plain.get_submodule(path) is module
    assert plain.state_dict().keys() == raw.keys()
    assert all(torch.equal(plain.state_dict()[k], raw[k]) for k in raw)
    assert amtl_layers(plain) == {}
    assert detach_amtl(plain) == (plain, {})


def test_attach_again_after_detach() -> None:
    model = make_model()
    attach_amtl_(model, all_counts(), RAW)
    detach_amtl(model)
    assert len(attach_amtl_(model, all_counts(), RAW)) == 5


def test_state_dict_and_parameter_groups() -> None:
    model = make_model()
    attach_amtl_(model, all_counts(), RAW)
    state = model.state_dict()
    amtl_keys = [k for k in state if ".amtl." in k]
    assert "tables.user.amtl.h_aml.0.weight" in amtl_keys
    assert "encoder.fields.bags.1.amtl.freq_index" in amtl_keys
    assert "tables.user.base_layer.weight" in state
    named = dict(model.named_parameters())
    amtl_ids = {id(p) for p in amtl_parameters(model)}
    model_ids = {id(p) for p in model_parameters(model)}
    assert amtl_ids.isdisjoint(model_ids)
    assert amtl_ids | model_ids == {id(p) for p in named.values()}
    assert all((".amtl." in n) == (id(p) in amtl_ids) for n, p in named.items())


def test_training_step_with_separate_learning_rates() -> None:
    model = make_model()
    attach_amtl_(model, all_counts(), RAW)
    scramble_(model)
    opt = torch.optim.Adam(
        [{"params": model_parameters(model), "lr": 1e-3}, {"params": amtl_parameters(model)}],
        lr=1e-2,
    )
    before = model.tables["user"].amtl.h_aml[-1].weight.clone()
    loss = model(make_batch()).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model.tables["user"].amtl.h_aml[-1].weight, before)


@pytest.mark.parametrize(
    ("dtype", "amtl_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_layer_follows_the_table_dtype(dtype: torch.dtype, amtl_dtype: torch.dtype) -> None:
    model = nn.ModuleDict({"t": nn.Embedding(50, 300)}).to(dtype)
    ids = torch.arange(50)
    before = model["t"](ids)
    attach_amtl_(model, {"t": torch.arange(50)}, RAW)
    layer = amtl_layers(model)["t"]
    assert layer.h_aml[0].weight.dtype == amtl_dtype
    assert layer.freq_index.dtype == torch.int64
    assert torch.equal(layer.lengths(), torch.full((50,), 300))
    out = model["t"](ids)
    assert out.dtype == dtype and torch.equal(out, before)
