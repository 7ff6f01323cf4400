"""parse_budget / Budget: every unit, decimal and integer forms, whitespace and case, bad input."""

import pytest

from compressor.allocation.budget import Budget, parse_budget


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("3.4GB", 3_400_000_000),
        ("3GB", 3_000_000_000),
        ("3.4GiB", 3_650_722_201),  # floor(3.4 * 2**30) = floor(3650722201.6)
        ("3GiB", 3 * 2**30),
        ("1.5MB", 1_500_000),
        ("2MB", 2_000_000),
        ("1.5MiB", 1_572_864),
        ("2MiB", 2 * 2**20),
        ("1.5KB", 1500),
        ("1.5kB", 1500),
        ("1.5KiB", 1536),
        ("1.0001KiB", 1024),  # 1024.1024 rounds down
        ("4KiB", 4096),
        ("1.9B", 1),  # bytes round down
        ("123B", 123),
        ("123", 123),
        ("123.9", 123),
        ("0.5GB", 500_000_000),
        (".5GB", 500_000_000),
        ("1e3MB", 1_000_000_000),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
    ],
)
def test_byte_units(text, nbytes):
    b = parse_budget(text)
    assert b == Budget(nbytes=nbytes, bits=None)
    assert isinstance(b.nbytes, int) and b.bits is None
    assert b.resolve(10**9) == nbytes  # bytes ignore the weight count


@pytest.mark.parametrize("text", ["3.4gb", "3.4Gb", "3.4 GB", "  3.4GB  ", "\t3.4 gB\n", "3.4gB"])
def test_whitespace_and_case(text):
    assert parse_budget(text).nbytes == 3_400_000_000


@pytest.mark.parametrize("text", ["3.4 gib", "3.4GIB", " 3.4 GiB "])
def test_gib_case(text):
    assert parse_budget(text).nbytes == 3_650_722_201


def test_exact_decimal_arithmetic():
    # 0.1 + 0.2 style float error would give 299999999 or 300000000.00000006 -> must be exact
    assert parse_budget("0.3GB").nbytes == 300_000_000
    assert parse_budget("4.35GB").nbytes == 4_350_000_000
    assert parse_budget("1.1MB").nbytes == 1_100_000


@pytest.mark.parametrize("text", ["2.5bits", "2.5 bits", "2.5bit", "2.5 BITS", " 2.5Bit "])
def test_bits_forms(text):
    b = parse_budget(text)
    assert b.bits == 2.5 and b.nbytes is None and b.is_bits


def test_bits_integer_form():
    assert parse_budget("3bits").bits == 3.0
    assert parse_budget("4 bit").bits == 4.0


def test_resolve_bits():
    b = parse_budget("2.5bits")
    assert b.resolve(8) == 2  # floor(2.5 * 8 / 8) = 2
    assert b.resolve(1000) == 312  # floor(312.5)
    assert b.resolve(0) == 0
    # exact decimal: 2.3 bits * 80 weights / 8 = 23 bytes exactly (float 2.3*80/8 = 22.999999999999996)
    assert parse_budget("2.3bits").resolve(80) == 23
    # DeepSeek-V3-sized weight count, exact integer arithmetic
    n = 671_000_000_000
    assert parse_budget("3bits").resolve(n) == 3 * n // 8
    assert Budget(nbytes=None, bits=4.0).resolve(7168 * 2048 * 3) == 7168 * 2048 * 3 // 2


def test_resolve_bad_weight_count():
    with pytest.raises(ValueError):
        parse_budget("2bits").resolve(-1)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "GB", "abc", "-1GB", "-2.5bits", "0", "0GB", "0bits", "0.0001B", "3.4XB", "3.4 G", "3.4 gigabytes",
     "1,000MB", "3.4.1GB", "nan", "infGB", "3.4 G B", "3.4bytes", "2.5 bitz", "1e400GB", "GB3", "0x10"],
)
def test_bad_inputs(text):
    with pytest.raises(ValueError) as exc:
        parse_budget(text)
    msg = str(exc.value)
    assert repr(text) in msg  # names the text
    for unit in ("GB", "GiB", "MB", "MiB", "KB", "KiB", "bits"):
        assert unit in msg  # lists the accepted units


def test_non_string_input():
    with pytest.raises(ValueError, match="accepted units"):
        parse_budget(3.4)  # type: ignore[arg-type]


def test_budget_validation():
    with pytest.raises(ValueError):
        Budget(nbytes=None, bits=None)
    with pytest.raises(ValueError):
        Budget(nbytes=10, bits=2.0)
    with pytest.raises(ValueError):
        Budget(nbytes=-5, bits=None)
    with pytest.raises(ValueError):
        Budget(nbytes=None, bits=float("nan"))
    b = parse_budget("1KB")
    with pytest.raises(Exception):
        b.nbytes = 5  # frozen
    assert str(parse_budget("1KB")) == "1000B" and str(parse_budget("2.5bits")) == "2.5bits"
