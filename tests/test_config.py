"""GradQConfig / QuantSpec: defaults, option parsing, validation, encoding, immutability."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from gradq_fx.config import (
    OPTIONS,
    Attention,
    Clipping,
    Fallback,
    GradQConfig,
    Granularity,
    Lowering,
    QuantSpec,
    Role,
    Rounding,
)

OPERANDS = ("weight", "activation", "gradient")
SPEC_FIELDS = {"granularity": Granularity, "rounding": Rounding, "clipping": Clipping}


def _key_table():
    """key -> (valid values, a function reading the key's value back from a config).

    Written from the documented meaning of each option, independently of `OPTIONS`.
    """
    table = {}
    for operand in OPERANDS:
        table[f"{operand}_bits"] = (
            list(range(2, 9)),
            lambda c, o=operand: getattr(c, o).bits,
        )
        for field, kind in SPEC_FIELDS.items():
            table[f"{operand}_{field}"] = (
                [member.value for member in kind],
                lambda c, o=operand, f=field: getattr(getattr(c, o), f).value,
            )
        table[f"{operand}_scaling"] = (
            [True, False],
            lambda c, o=operand: getattr(c, o).scaling,
        )
    table["gradient_quantizer"] = (
        [member.value for member in Clipping],
        lambda c: c.gradient.clipping.value,
    )
    for flag in ("forward", "dgrad", "wgrad", "stats", "convolutions", "compile_once"):
        table[flag] = ([True, False], lambda c, f=flag: getattr(c, f))
    table["attention"] = ([member.value for member in Attention], lambda c: c.attention.value)
    table["lowering"] = (
        ["auto", "reference", "inductor_template", "triton", "fused"],
        lambda c: c.lowering.value,
    )
    table["fallback"] = (["slower", "never"], lambda c: c.fallback.value)
    for globs in ("include", "exclude"):
        table[globs] = (
            ["blocks.*", ["blocks.0.*", "head"], [], ("patch_embed.proj",)],
            lambda c, g=globs: getattr(c, g),
        )
    return table


KEY_TABLE = _key_table()
VALID_CASES = [(key, value) for key, (values, _) in KEY_TABLE.items() for value in values]


def _expected_read_back(key, value):
    if key in ("include", "exclude"):
        return (value,) if isinstance(value, str) else tuple(value)
    return value


# --------------------------------------------------------------------------- defaults


def test_defaults():
    config = GradQConfig()
    accurate = QuantSpec(8, Granularity.PER_ROW, Rounding.NEAREST, Clipping.MINMAX)
    assert config.weight == accurate
    assert config.activation == accurate
    assert config.gradient == QuantSpec(
        8, Granularity.PER_ROW, Rounding.NEAREST, Clipping.IQR, scaling=True
    )
    assert (config.forward, config.dgrad, config.wgrad) == (True, True, True)
    assert config.attention is Attention.FLOAT
    assert config.lowering is Lowering.AUTO
    assert config.fallback is Fallback.SLOWER
    assert config.convolutions is True
    assert config.compile_once is True
    assert config.include == ("*",)
    assert config.exclude == ()
    assert all(config.quantizes(role) for role in Role)


def test_quantspec_defaults_and_qmax():
    spec = QuantSpec()
    assert (spec.bits, spec.granularity, spec.rounding, spec.clipping, spec.scaling) == (
        8,
        Granularity.PER_ROW,
        Rounding.NEAREST,
        Clipping.MINMAX,
        False,
    )
    assert [QuantSpec(bits=b).qmax for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]


def test_from_options_empty_and_none_give_defaults():
    assert GradQConfig.from_options(None) == GradQConfig()
    assert GradQConfig.from_options({}) == GradQConfig()


# --------------------------------------------------------------------------- from_options


def test_key_table_covers_every_option():
    # Keeps this file in step with the package: a new option needs a row in KEY_TABLE.
    assert set(KEY_TABLE) == set(OPTIONS)


@pytest.mark.parametrize(("key", "value"), VALID_CASES, ids=[f"{k}={v}" for k, v in VALID_CASES])
def test_from_options_valid_value_round_trips(key, value):
    config = GradQConfig.from_options({key: value})
    _, read_back = KEY_TABLE[key]
    assert read_back(config) == _expected_read_back(key, value)
    options = config.to_options()
    json.dumps(options)  # plain and serialisable
    assert GradQConfig.from_options(options) == config


@pytest.mark.parametrize("key", sorted(KEY_TABLE))
def test_from_options_changes_only_its_own_field(key):
    values, read_back = KEY_TABLE[key]
    default = GradQConfig()
    other = next(v for v in values if read_back(default) != _expected_read_back(key, v))
    config = GradQConfig.from_options({key: other})
    assert config != default
    # Reset that one field through from_options; everything else must still be default.
    assert GradQConfig.from_options({key: other, **_default_option(key)}) == default


def _default_option(key):
    if key == "gradient_quantizer":
        return {key: GradQConfig().gradient.clipping.value}
    return {key: GradQConfig().to_options()[key]}


def test_from_options_accepts_enum_members():
    config = GradQConfig.from_options(
        {
            "weight_granularity": Granularity.PER_TENSOR,
            "gradient_rounding": Rounding.STOCHASTIC,
            "activation_clipping": Clipping.IQR,
            "attention": Attention.INT8,
        }
    )
    assert config.weight.granularity is Granularity.PER_TENSOR
    assert config.gradient.rounding is Rounding.STOCHASTIC
    assert config.activation.clipping is Clipping.IQR
    assert config.attention is Attention.INT8


def test_gradient_quantizer_sets_gradient_clipping():
    config = GradQConfig.from_options({"gradient_quantizer": "minmax"})
    assert config.gradient.clipping is Clipping.MINMAX
    assert config.weight == GradQConfig().weight
    assert config.activation == GradQConfig().activation


def test_many_options_at_once_round_trip():
    options = {
        "weight_bits": 4,
        "activation_granularity": "per_tensor",
        "gradient_rounding": "stochastic",
        "gradient_clipping": "minmax",
        "dgrad": False,
        "attention": "int8",
        "include": ["blocks.*"],
        "exclude": "head",
    }
    config = GradQConfig.from_options(options)
    assert config.weight.bits == 4
    assert config.activation.granularity is Granularity.PER_TENSOR
    assert config.gradient == QuantSpec(8, Granularity.PER_ROW, Rounding.STOCHASTIC, scaling=True)
    assert config.quantizes(Role.FORWARD) and config.quantizes(Role.WGRAD)
    assert not config.quantizes(Role.DGRAD)
    assert config.include == ("blocks.*",) and config.exclude == ("head",)
    assert GradQConfig.from_options(config.to_options()) == config


def test_unknown_key_names_it_and_lists_valid_options():
    with pytest.raises(ValueError) as info:
        GradQConfig.from_options({"weight_bitz": 8, "forward": True})
    message = str(info.value)
    assert "weight_bitz" in message
    for key in OPTIONS:
        assert key in message


# --------------------------------------------------------------------------- bad values

_ENUM_CHOICES = {
    "granularity": [m.value for m in Granularity],
    "rounding": [m.value for m in Rounding],
    "attention": [m.value for m in Attention],
    "clipping": [m.value for m in Clipping],
}

BAD_CASES = (
    [(f"{op}_bits", bad, ["2", "8"]) for op in OPERANDS for bad in (1, 9, "8", True, 8.0)]
    + [(f"{op}_granularity", "per_col", _ENUM_CHOICES["granularity"]) for op in OPERANDS]
    + [(f"{op}_rounding", 1, _ENUM_CHOICES["rounding"]) for op in OPERANDS]
    + [(f"{op}_clipping", "absmax", _ENUM_CHOICES["clipping"]) for op in OPERANDS]
    + [("gradient_quantizer", "iqs_typo", _ENUM_CHOICES["clipping"])]
    + [("attention", "fp8", _ENUM_CHOICES["attention"])]
    + [("lowering", "cublas", ["auto", "reference", "inductor_template", "triton", "fused"])]
    + [("fallback", "always", ["slower", "never"])]
    + [
        (flag, "yes", ["True", "False"])
        for flag in ("forward", "dgrad", "wgrad", "convolutions", "compile_once")
    ]
    + [(f"{op}_scaling", 1, ["True", "False"]) for op in OPERANDS]
    + [("forward", 1, ["True", "False"])]
    + [(globs, 3, ["glob"]) for globs in ("include", "exclude")]
    + [("include", ["ok.*", 3], ["glob"])]
)


@pytest.mark.parametrize(
    ("key", "value", "choices"), BAD_CASES, ids=[f"{k}={v!r}" for k, v, _ in BAD_CASES]
)
def test_bad_value_names_key_and_choices(key, value, choices):
    with pytest.raises(ValueError) as info:
        GradQConfig.from_options({key: value})
    message = str(info.value)
    assert key in message
    for choice in choices:
        assert str(choice) in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 9},
        {"bits": True},
        {"bits": "8"},
        {"granularity": "per_row"},
        {"rounding": "nearest"},
        {"clipping": Granularity.PER_ROW},
    ],
)
def test_quantspec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": "8:per_row:nearest:minmax"},
        {"forward": 1},
        {"convolutions": "yes"},
        {"attention": "float"},
        {"include": ["*"]},
        {"exclude": ("a", 3)},
    ],
)
def test_gradqconfig_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        GradQConfig(**kwargs)


# --------------------------------------------------------------------------- QuantSpec codec

ALL_SPECS = [
    QuantSpec(bits, granularity, rounding, clipping, scaling)
    for bits, granularity, rounding, clipping, scaling in itertools.product(
        range(2, 9), Granularity, Rounding, Clipping, (False, True)
    )
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.encode())
def test_quantspec_encode_decode_round_trip(spec):
    text = spec.encode()
    assert isinstance(text, str) and text  # non-empty: "" means float to gradq.mm
    scaling = "scaled" if spec.scaling else "unscaled"
    assert text == (
        f"{spec.bits}:{spec.granularity.value}:{spec.rounding.value}:{spec.clipping.value}"
        f":{scaling}"
    )
    assert QuantSpec.decode(text) == spec


def test_quantspec_encodings_are_distinct():
    assert len({spec.encode() for spec in ALL_SPECS}) == len(ALL_SPECS)


def test_quantspec_default_encoding():
    assert QuantSpec().encode() == "8:per_row:nearest:minmax:unscaled"


# --------------------------------------------------------------------------- frozen


def test_configs_are_frozen():
    config = GradQConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.forward = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight = QuantSpec(bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight.bits = 4
    spec = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.granularity = Granularity.PER_TENSOR
    assert config == GradQConfig() and spec == QuantSpec()


def test_configs_are_hashable():
    assert len({GradQConfig(), GradQConfig(), GradQConfig(dgrad=False)}) == 2
